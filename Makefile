# Two commands on a fresh machine: `make demo` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch; a bare or newer requirement would pull a multi-GB CUDA build.
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.deltareg-installed
PYTEST_WORKERS ?= 2

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[server,torch,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m deltareg.client.demo

test: install lint
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS)

# mypy cannot follow the editable install's import hook, so it checks a tree of links shaped like the
# installed namespace (deltareg/registry, deltareg/client).
TYPECHECK := build/typecheck
lint: install
	$(VENV)/bin/ruff check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/deltareg
	ln -s $(CURDIR)/registry $(TYPECHECK)/deltareg/registry
	ln -s $(CURDIR)/client $(TYPECHECK)/deltareg/client
	cd $(TYPECHECK) && MYPYPATH=. $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		-p deltareg.registry -p deltareg.client

bench: install
	$(PY) bench/bench_fingerprint.py
	$(PY) bench/bench_apply.py
	$(PY) bench/bench_apply_files.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
