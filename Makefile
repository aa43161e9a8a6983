# The README's two commands are `make demo` and `make test`; .ci/run calls `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
# The environment's interpreter: the distribution's CPython 3.11 when there is one (Debian's is built with PGO
# and LTO, as the deploy image's python:3.11-slim is; a default pyenv build is neither, and costs the learner
# worker ~10% more CPU per event: online/README.md, "Where the worker's CPU goes"), else the first $(PYTHON) on PATH.
ENV_PYTHON ?= $(firstword $(wildcard /usr/bin/python3.11) $(shell command -v $(PYTHON)))
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
RUN := $(UV) run --frozen

.PHONY: setup demo test bench compose-tools clean postgres-tools prod-stack

setup: ## install uv if missing, then the locked environment (.venv)
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv>=0.5"
	$(UV) sync --frozen --python $(ENV_PYTHON)

compose-tools: ## Debian's docker-compose 1.29 validates deploy/ without an engine; fails when it cannot be installed
	@command -v docker-compose >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null); } || \
	  { echo "make compose-tools: docker-compose is missing and cannot be installed here (needs root + apt-get);" \
	  "install it to validate deploy/docker-compose.yml" >&2; exit 1; }

demo: setup ## embedded broker + MLflow, end to end
	$(RUN) fedstream demo

test: setup compose-tools postgres-tools ## the whole test suite (installs the tools its tests need)
	$(RUN) pytest -n 2 --dist loadfile

bench: setup ## every benchmark (BENCH_QUICK=1 for a short run)
	$(RUN) python -m benchmarks

postgres-tools: ## Debian's PostgreSQL server binaries for the production stack (root + apt; .ci/run calls this)
	@{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null) || \
	  echo "postgresql-15 not installed: tests/test_production_stack.py will be skipped (it fails under CI=true)"; }

prod-stack: setup postgres-tools ## MLflow server on PostgreSQL + S3 artifacts, locally (deploy/'s design) until Ctrl-C
	$(RUN) python -m registry.stack

clean:
	rm -rf .fedstream
