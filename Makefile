# callstream: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## create .venv and install callstream with its dev tools

.PHONY: run
run: $(STAMP) ## run the whole pipeline (local Kafka, ingress, consumers) on embedded defaults
	$(BIN)/callstream run

.PHONY: system-deps
system-deps: ## install the Debian packages the tests use (PostgreSQL, kcat, Prometheus, wrk)
	scripts/install-system-deps

.PHONY: lint
lint: $(STAMP) ## ruff, mypy --strict and the layer rule (import-linter)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy examples/crm-forward/crm_forward.py  # a package of its own, outside the tree's
	$(BIN)/lint-imports

.PHONY: test
test: system-deps $(STAMP) lint ## everything CI runs: system packages, lint, the whole test suite
	$(BIN)/pytest

.PHONY: test-unit
test-unit: $(STAMP) ## the fast loop: tests that need no broker or database (seconds)
	$(BIN)/pytest tests/unit

.PHONY: bench
bench: system-deps $(STAMP) ## measure throughput, latency and cost here (docs/performance.md; BENCH_ARGS=...)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/callstream bench $(BENCH_ARGS)

.PHONY: clean
clean: ## stop the local broker and remove local state (.callstream/)
	-$(BIN)/callstream kafka stop
	rm -rf .callstream
