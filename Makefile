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

.PHONY: test bench bench-quick check-cuda gpu-check compat info clean

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

# For a machine with a GPU, as it is: its own python3 and torch, no venv, no network (tools/gpu_check.sh).
# Two steps of at most 5 minutes each; results under $$OUT when set, else bench-results/gpu.
gpu-check:
	bash tools/gpu_check.sh all

# The oldest supported versions (a GPU machine's torch 2.11 / triton 3.6): a separate venv, the CPU
# suite run on a copy of the working tree (its in-place build must not replace the main one's library).
# Not part of `make test`: it installs a second multi-GB torch.
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_PINS := torch==2.11.0 torchvision==0.26.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4"
COMPAT_SRC := $(COMPAT_VENV)/src

$(COMPAT_VENV)/.stamp-deps: requirements-dev.txt
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade "pip>=23.2"
	grep -vE '^(torch|torchvision|triton|transformers|numpy)([=<>~ ]|$$)' requirements-dev.txt > $(COMPAT_VENV)/requirements.txt
	$(COMPAT_PY) -m pip install -q $(COMPAT_PINS) -r $(COMPAT_VENV)/requirements.txt
	touch $@

compat: $(COMPAT_VENV)/.stamp-deps
	rm -rf $(COMPAT_SRC) && mkdir -p $(COMPAT_SRC)
	git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(COMPAT_SRC)
	ln -sfn ../triton_kernels $(COMPAT_SRC)/clipfast/triton_kernels  # what the editable install maps
	cd $(COMPAT_SRC) && PATH=$(abspath $(COMPAT_VENV))/bin:$$PATH $(abspath $(COMPAT_PY)) setup.py -q build_ext --inplace
	$(COMPAT_PY) -c "import torch, triton, numpy, transformers as t; print('compat:', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, 'transformers', t.__version__)"
	cd $(COMPAT_SRC) && PYTHONPATH=$(abspath $(COMPAT_SRC)) $(abspath $(COMPAT_PY)) -m pytest -q tests benchmarks --benchmark-disable

clean:
	rm -rf build *.egg-info clipfast/_C*.so bench-results .gpu-deps $(VENV)/.stamp-build
