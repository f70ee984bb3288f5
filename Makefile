# clipfast developer commands. `make test` and `make bench` set everything up on a fresh machine:
# they create .venv when missing, install the pinned environment, build the native library, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The venv's bin first: torch's extension builder runs the venv's ninja.
export PATH := $(abspath $(VENV))/bin:$(PATH)
NVCC ?= $(or $(wildcard /usr/local/cuda/bin/nvcc),nvcc)
CUDA_ARCH_FLAGS := -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90
NATIVE_SOURCES := setup.py $(shell find csrc -type f)

.PHONY: test bench bench-quick check-cuda gpu-check info clean

$(VENV)/.stamp-deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23.2"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# Rebuilt when setup.py or anything under csrc/ changes; --no-build-isolation builds against our torch.
$(VENV)/.stamp-build: $(VENV)/.stamp-deps $(NATIVE_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: $(VENV)/.stamp-build
	$(PY) -m pytest -q tests benchmarks --benchmark-disable

bench: $(VENV)/.stamp-build
	$(PY) -m clipfast.bench --op all

bench-quick: $(VENV)/.stamp-build
	$(PY) -m clipfast.bench --op all --quick

info: $(VENV)/.stamp-build
	$(PY) -m clipfast.info

# Every CUDA source for sm_80 and sm_90 with the ptxas report; any register spill is an error.
check-cuda:
	@set -e; for f in csrc/cuda/*.cu; do \
	  echo "== $$f"; \
	  $(NVCC) -O3 -std=c++17 -Icsrc/include -Xptxas=-v,--warn-on-spills,-Werror $(CUDA_ARCH_FLAGS) -c $$f -o /dev/null; \
	done; echo "check-cuda: every kernel compiled for sm_80 and sm_90 without register spills"

# For a machine with a GPU: build, GPU tests, GPU benchmark; short table last.
gpu-check: $(VENV)/.stamp-build
	$(PY) -m clipfast.bench.gpu_check

clean:
	rm -rf build *.egg-info clipfast/_C*.so bench-results $(VENV)/.stamp-build
