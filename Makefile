# Two commands on a fresh machine: `make demo` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch; a bare or newer requirement would pull a multi-GB CUDA build.
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.deltareg-installed
PYTEST_WORKERS ?= 2

.PHONY: install chromium demo test lint bench bench-report clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[server,torch,dev]"
	$(MAKE) --no-print-directory chromium
	touch $(STAMP)

install: $(STAMP)

# The browser tests (tests/ui) drive Debian's Chromium through Playwright; installed once, as root.
chromium:
	@test -x /usr/bin/chromium || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
		|| (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium)

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

# Every benchmark at its full default size (medians of 5 runs), its results as JSON in bench/results/,
# then BENCHMARKS.md and the plots (bench/plots/) from them. Run it on an otherwise idle machine; the
# scale and metadata benchmarks need PostgreSQL on 127.0.0.1:5432 (user postgres), like the tests.
BENCH_RESULTS := bench/results
BENCH_STAMP := $(VENV)/.deltareg-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PIP) install --quiet -e ".[server,torch,dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	mkdir -p $(BENCH_RESULTS)
	$(PY) bench/bench_fingerprint.py --json-out $(BENCH_RESULTS)/fingerprint.json
	$(PY) bench/bench_apply.py --breakdown --json-out $(BENCH_RESULTS)/apply.json
	$(PY) bench/bench_apply_files.py --json-out $(BENCH_RESULTS)/apply_files.json
	$(PY) bench/bench_registry_transfer.py --json-out $(BENCH_RESULTS)/registry_transfer.json
	$(PY) bench/bench_cache.py --json-out $(BENCH_RESULTS)/cache.json
	$(PY) bench/bench_scale.py --json-out $(BENCH_RESULTS)/scale.json
	$(PY) bench/bench_metadata.py --json-out $(BENCH_RESULTS)/metadata.json
	$(PY) bench/report.py

# BENCHMARKS.md and the plots again from the results already in bench/results/ (no benchmark runs).
bench-report: $(BENCH_STAMP)
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
