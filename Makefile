# erp-push — every target prepares its own environment (.venv) when needed.
# `make help` lists the targets.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOWEST_VENV ?= .venv-lowest
# What the lowest allowed versions must pass: settings and CLI (pydantic, pydantic-settings,
# typer, rich; completion), Nuntiq (httpx), SFTP (paramiko; its ssh-agent client).
LOWEST_TESTS ?= tests/test_settings.py tests/test_cli.py tests/test_render.py \
	tests/test_claim.py tests/test_transport.py tests/test_known_hosts.py \
	tests/test_conveniences.py
PORT ?= 8765
SANDBOX_API_KEY ?= sandbox-key
PYTEST_ARGS ?=
BENCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv test test-lowest demo sandbox lint bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## Create .venv and install erp-push with its test tools

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

test: venv ## Run the whole test suite (real sandbox + real SFTP servers on loopback)
	$(BIN)/pytest $(PYTEST_ARGS)

# A fresh venv each time, so nothing newer lingers from an earlier install.
test-lowest: ## Run the core tests on the lowest dependency versions pyproject.toml allows
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/pip install --quiet -e '.[dev]' $$($(PYTHON) tests/lowest_versions.py)
	$(LOWEST_VENV)/bin/pip list 2>/dev/null | grep -iE '^(typer|rich|pydantic|pydantic-settings|paramiko|httpx) '
	$(LOWEST_VENV)/bin/pytest $(LOWEST_TESTS) $(PYTEST_ARGS)

demo: venv ## Push seeded invoices from the sandbox to a local SFTP server and show the result
	$(BIN)/python -m tests.demo

sandbox: venv ## Run the Nuntiq sandbox in the foreground on 127.0.0.1:$(PORT)
	$(BIN)/python -m tests.sandbox --host 127.0.0.1 --port $(PORT) --api-key $(SANDBOX_API_KEY)

lint: venv ## ruff and mypy (strict) on the package and the tests
	$(BIN)/ruff check src tests
	$(BIN)/mypy

bench: venv ## Measure erp-push beside a bare paramiko loop (needs root + sshd; BENCH_ARGS=--quick)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) $(LOWEST_VENV) .pytest_cache .mypy_cache .ruff_cache .demo
