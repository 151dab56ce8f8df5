# aipipe: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test lint typecheck unit bench clean venv browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# `make demo DEMO_ARGS=--keep` leaves the stages and the operator dashboard running after the demo.
demo: $(STAMP)
	# a temporary AIPIPE_HOME: a demo never restores (or archives into) an earlier one
	AIPIPE_HOME=$$(mktemp -d) $(BIN)/aipipe demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check pipeline stages schemas

typecheck: $(STAMP)
	$(BIN)/mypy

# The dashboard's browser tests drive Debian's chromium through Debian's chromedriver (no driver download).
browser:
	@if ! command -v chromium >/dev/null 2>&1 || ! test -x /usr/bin/chromedriver; then \
		echo "installing Debian's chromium and chromium-driver for the browser tests"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/aipipe bench --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
