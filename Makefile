# erp-push — every target prepares its own environment (.venv) when needed.
# `make help` lists the targets.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8765
SANDBOX_API_KEY ?= sandbox-key
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv test demo sandbox lint bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## Create .venv and install erp-push with its test tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

test: venv ## Run the whole test suite (real sandbox + real SFTP servers on loopback)
	$(BIN)/pytest $(PYTEST_ARGS)

demo: venv ## Push seeded invoices from the sandbox to a local SFTP server and show the result
	$(BIN)/python -m tests.demo

sandbox: venv ## Run the Nuntiq sandbox in the foreground on 127.0.0.1:$(PORT)
	$(BIN)/python -m tests.sandbox --host 127.0.0.1 --port $(PORT) --api-key $(SANDBOX_API_KEY)

lint: venv ## ruff and mypy (strict) on the package
	$(BIN)/ruff check src tests
	$(BIN)/mypy

bench: venv ## Measure erp-push beside a bare paramiko loop (needs root + sshd; BENCH_ARGS=--quick)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo
