# openmill: the two commands of the quick start are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow setup setup-dev clean

setup:
	@bash scripts/setup_env.sh

setup-dev:
	@bash scripts/setup_env.sh dev

## Run the whole pipeline on the embedded default corpus (recipes/tiny.yaml).
demo: setup
	$(VENV)/bin/openmill run recipes/tiny.yaml

## The default test suite (fast, CPU only).
test: setup-dev
	$(PY) -m pytest -q

## Slow and optional checks (long trainings, external parity).
test-slow: setup-dev
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs/ .pytest_cache
