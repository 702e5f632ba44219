# openmill: the two commands of the quick start are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow setup setup-dev setup-slow clean

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

## Slow and optional checks (the whole tiny pipeline, Ray's local mode).
test-slow: setup-slow
	$(PY) -m pytest -q -m slow

setup-slow:
	@bash scripts/setup_env.sh dev,ray

clean:
	rm -rf runs/ .pytest_cache
