# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs the pinned stack, builds the extension, runs the demo
#   make test   the same set-up, then the test suite
# Variables: PYTHON (the interpreter that makes the venv), VENV, PYTEST_ARGS.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STACK := $(VENV)/.stack-installed
EDITABLE := $(VENV)/.xdc-fast-editable
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: demo test build bench-sweep cpp-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The pinned stack is several GB: installed once per venv, again only when the pins change.
$(STACK): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(EDITABLE): pyproject.toml setup.py | $(STACK)
	XDC_FAST_NO_EXTENSION=1 $(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Incremental (ninja keeps build/): after the first build only changed sources recompile.
build: $(EDITABLE)
	$(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

# Each demo gets its own folder, so running it again never overwrites an earlier one.
DEMO_OUT ?= xdc-fast-demo/$(shell date +%Y%m%d-%H%M%S)
demo: build
	$(VENV)/bin/xdc-fast demo --out $(DEMO_OUT)

bench-sweep: build
	$(PY) benchmarks/kmeans_sweep.py --out benchmarks/results/kmeans_cpu.md

cpp-test: $(STACK)
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DPython3_EXECUTABLE=$(PY) $(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME))
	cmake --build build/cmake -j $(MAX_JOBS)
	ctest --test-dir build/cmake --output-on-failure

clean:
	rm -rf build xdc_fast/_C*.so *.egg-info
