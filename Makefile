# Common tasks. `make help` lists them. Every target sets up the virtual
# environment first, from the exact versions in requirements.lock.

VENV ?= .venv
PYTHON ?= python3.11
BIN := $(abspath $(VENV))/bin

# Stage commands in dvc.yaml call `python`; this puts the venv's first on PATH.
export PATH := $(BIN):$(PATH)
# No usage reports or update checks: these machines may have no internet.
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
# The install compiles no bytecode (see below); Python compiles each module the
# first time it is imported and caches it, unless this variable forbids that.
unexport PYTHONDONTWRITEBYTECODE

# Tracking server (docs/team.md). It listens on 127.0.0.1 unless HOST says
# otherwise, keeps runs in PostgreSQL (this user's role and database DB_NAME,
# over the local socket) and serves artifacts from SERVER_DIR/artifacts.
HOST ?= 127.0.0.1
PORT ?= 5000
WORKERS ?= 2
DB_NAME ?= mlflow
DB_USER ?= $(shell id -un)
DB_SOCKET ?= /var/run/postgresql
BACKEND_STORE_URI ?= postgresql://$(DB_USER)@/$(DB_NAME)?host=$(DB_SOCKET)
SERVER_DIR ?= mlserver
# Where the server keeps artifacts: a folder, or a URI such as s3://bucket/mlflow.
ARTIFACTS_DESTINATION ?= $(SERVER_DIR)/artifacts
# AUTH=basic: MLflow's basic-auth app (user names and passwords).
AUTH ?= none
# DB_ARGS=--createdb lets the role create databases (the tests need it).
DB_ARGS ?=
# More `mlflow server` options, e.g. SERVER_ARGS="--allowed-hosts mlflow.example.org".
SERVER_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup run test test-all params lint format ui lock clean db server upload

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

# The lock pins every package, pip itself included, so pip resolves nothing
# (--no-deps). pip goes first; the other packages install in INSTALL_JOBS
# parallel parts, since one pip process keeps only one core busy. No bytecode
# is compiled at install time (--no-compile): only the modules that the stages
# import get compiled, on first use.
INSTALL_JOBS ?= 3
PIP_INSTALL = $(BIN)/python -m pip install --quiet --no-deps --no-compile
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP_INSTALL) $$(grep '^pip==' requirements.lock)
	rm -rf $(VENV)/lock-parts && mkdir $(VENV)/lock-parts
	awk -v jobs=$(INSTALL_JOBS) -v dir=$(VENV)/lock-parts \
		'/==/ && !/^pip==/ { print > (dir "/" (n++ % jobs) ".txt") }' requirements.lock
	pids=""; for part in $(VENV)/lock-parts/*.txt; do \
		$(PIP_INSTALL) -r $$part & pids="$$pids $$!"; \
	done; failed=0; for pid in $$pids; do wait $$pid || failed=1; done; \
	test $$failed = 0
	$(PIP_INSTALL) --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed ## Create .venv with the pinned dependencies

run: setup ## Run the whole pipeline (dvc repro) on the configured dataset
	dvc repro

test: setup ## Run the test suite, without the tests marked slow
	python -m pytest -m "not slow"

test-all: setup ## Run every test, the slow ones included
	python -m pytest

params: setup ## Regenerate params.yaml from conf/ (pass overrides as ARGS="k=v ...")
	python -m stages.config $(ARGS)

lint: setup ## Check style with ruff
	ruff check stages tests bench
	ruff format --check stages tests bench

format: setup ## Format the code with ruff
	ruff format stages tests bench
	ruff check --fix stages tests bench

ui: setup ## Open the MLflow UI on http://127.0.0.1:5000 (PORT=... for another)
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT)

db: setup ## Create the PostgreSQL role and database of the tracking server
	python -m stages.server create-db --role '$(DB_USER)' --database '$(DB_NAME)' $(DB_ARGS)

server: setup ## Run the MLflow tracking server (PostgreSQL, served artifacts) on HOST:PORT
	python -m stages.server serve --host '$(HOST)' --port '$(PORT)' \
		--workers '$(WORKERS)' --backend-store-uri '$(BACKEND_STORE_URI)' \
		--server-dir '$(SERVER_DIR)' --artifacts-destination '$(ARTIFACTS_DESTINATION)' \
		$(if $(filter basic,$(AUTH)),--basic-auth) \
		$(SERVER_ARGS)

upload: setup ## Copy runs logged locally while the server was unreachable to it
	python -m stages.upload $(ARGS)

lock: ## Rewrite requirements.lock from the current .venv
	$(BIN)/python -m pip freeze --all --exclude-editable > requirements.lock

clean: ## Remove pipeline outputs (not the MLflow store)
	rm -rf data/raw data/processed data/split models/model.keras

.PHONY: bench
bench: setup ## Run the benchmarks into docs/benchmarks.md (ARGS=--quick: short check)
	python -m bench.run $(ARGS)
