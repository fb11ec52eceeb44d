# Each target is self-sufficient on a fresh clone: it creates .venv and installs qrobust into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast suite bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision pinned to the releases this machine's disk carries (no multi-GB download).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test,onnx,pt2e]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest tests -q

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

suite: $(STAMP)
	$(PY) -m qrobust run -q

bench: $(STAMP)
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(PY) -m ruff check qrobust tests benchmarks tools examples
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache
