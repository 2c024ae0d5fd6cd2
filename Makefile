# The two set-up commands: `make demo` and `make test`. Both create .venv if missing,
# install torch only when it is not importable (so a CUDA build you installed is kept),
# then install lightnets with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint demo clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
