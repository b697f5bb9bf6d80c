# dmdr: developer and user entry points. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION ?= 0.13.9
# A local wheel mirror, used first when this machine has one; the public index otherwise.
LOCAL_INDEX ?= $(wildcard /opt/pypi-more/simple)
UV_ARGS := $(if $(LOCAL_INDEX),--index file://$(LOCAL_INDEX),)
PYTEST_ARGS ?=
DEMO_DIR ?= outputs

.PHONY: help venv test test-fast demo bench clean

.DEFAULT_GOAL := help
include ci/make/helm.mk
include ci/make/image.mk

help: ## list targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml ci/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip install --python $(PY) $(UV_ARGS) -c ci/constraints.txt -e '.[dev]'
	touch $@

venv: $(VENV)/.installed ## create .venv with the pinned dev stack (torch 2.14.1)

test: venv ## run every test (slow ones included, as CI does)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv ## unit tests only
	$(PY) -m pytest -m "not slow" tests/unit $(PYTEST_ARGS)

demo: venv ## the two training stages (cold start, DMD + ReFL) on the tiny model, on CPU
	rm -rf $(DEMO_DIR)/demo
	$(VENV)/bin/dmdr demo --output-dir $(DEMO_DIR) --exp-name demo

bench: venv ## step benchmark of the tiny preset (CPU) or SDXL-size UNet (GPU)
	$(PY) tests/bench/bench_step.py

clean: ## remove outputs and caches (keeps .venv)
	rm -rf $(DEMO_DIR) .pytest_cache
