# openmill: the two commands of the quick start are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow test-llamacpp setup setup-dev setup-slow setup-llamacpp clean

setup:
	@bash scripts/setup_env.sh

# The lm-eval adapter's test runs in the default suite, so the default setup installs lm_eval too.
setup-dev:
	@bash scripts/setup_env.sh dev,eval-harness

## Run the whole pipeline on the embedded default corpus (recipes/tiny.yaml).
demo: setup
	$(VENV)/bin/openmill run recipes/tiny.yaml

## The default test suite (fast, CPU only).
test: setup-dev
	$(PY) -m pytest -q

## Slow and optional checks (the whole tiny pipeline, Ray's local mode).
test-slow: setup-slow
	$(PY) -m pytest -q -m slow

## Parity with llama.cpp (builds llama-cpp-python from source the first time: ~10+ minutes on 2 cores).
test-llamacpp: setup-llamacpp
	$(PY) -m pytest -q -m llamacpp

setup-llamacpp:
	@CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF}" bash scripts/setup_env.sh dev,llamacpp

setup-slow:
	@bash scripts/setup_env.sh dev,ray,eval-harness

clean:
	rm -rf runs/ .pytest_cache
