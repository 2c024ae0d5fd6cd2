# The two set-up commands: `make demo` and `make test`. Both create .venv if missing,
# install torch only when it is not importable (so a CUDA build you installed is kept),
# then install lightnets with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
GPU_CHECK_OUT ?= gpu-check.json
GPU_CHECK_BUDGET ?= 450

.PHONY: install test lint demo gpu-check interop lce-test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: install
	$(PY) -m lightnets demo

# The GPU lane (CONTRIBUTING.md): the cuda tests and the fbn/norm/bop benchmarks on CUDA, one
# JSON summary in $(GPU_CHECK_OUT); exits non-zero on any failure, 2 without a CUDA device.
gpu-check: install
	$(PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) --budget $(GPU_CHECK_BUDGET)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# The interop lane (CONTRIBUTING.md): a separate environment with torchvision and timm (which
# the CPU torch of .venv cannot load), then lightnets over timm / torchvision models; writes
# docs/results/interop/. INTEROP_VENV=path reuses an environment you already have.
INTEROP_VENV ?= .venv-interop
INTEROP_OUT ?= docs/results/interop

interop:
	test -x $(INTEROP_VENV)/bin/python || python3 -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -c "import torchvision, timm" 2>/dev/null || $(INTEROP_VENV)/bin/pip install -q "torch==2.14.*" "torchvision==0.29.*" timm
	$(INTEROP_VENV)/bin/pip install -q -e .
	$(INTEROP_VENV)/bin/python benchmarks/interop.py --out $(INTEROP_OUT)

# The LCE lane (CONTRIBUTING.md): a separate environment with lightnets[lce] (TensorFlow-CPU
# 2.16, tf-keras, larq 0.14, Larq Compute Engine 0.16, numpy < 2), then the export to LCE, Bop
# against larq itself, and the packing / optimizer tests under that stack's numpy.
# LCE_VENV=path reuses an environment you already have.
LCE_VENV ?= .venv-lce

lce-test:
	test -x $(LCE_VENV)/bin/python || python3 -m venv $(LCE_VENV)
	$(LCE_VENV)/bin/python -c "import torch" 2>/dev/null || $(LCE_VENV)/bin/pip install -q "$(TORCH_SPEC)"
	$(LCE_VENV)/bin/pip install -q -e ".[lce,dev]"
	TF_USE_LEGACY_KERAS=1 $(LCE_VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests/lce tests/deploy/test_lce.py tests/deploy/test_pack.py tests/optim
