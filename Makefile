# Everything a fresh machine needs: `make demo` (the main job) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps install kafka demo test test-fast lint stop clean

setup: install kafka

# Java runs the broker and Maven fetches its jars; Chromium loads the debug page in its browser test. All come
# from Debian when missing.
system-deps:
	@command -v java >/dev/null && command -v mvn >/dev/null && command -v chromium >/dev/null || { \
	  echo "installing OpenJDK, Maven and Chromium (apt-get) …"; \
	  apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven chromium >/dev/null; }

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing pymk and its dependencies into $(VENV) (log: $(VENV)/install.log) ..."
	@{ $(BIN)/pip install --upgrade pip setuptools wheel && $(BIN)/pip install -e '.[test]'; } \
	  > $(VENV)/install.log 2>&1 || { tail -40 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

install: system-deps $(STAMP)

kafka: install
	$(BIN)/pymk kafka start

demo: install
	$(BIN)/python -m pymk.demo

# The test session starts the broker itself when none is running, and stops what it started.
# --durations: the slowest tests in every run's output, to keep the whole run well under 20 minutes.
# -n 2: two pytest processes (pytest-xdist), whole files each; every broker test has its own topics, group and
# port, so the two share the one broker. Most broker tests wait on workers and the broker as much as they compute.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra --durations=25 -n 2 --dist loadfile

# The tiers without the broker (pure functions, faust test_context): a few minutes, nothing started.
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile -m "not broker"

lint: install
	$(BIN)/ruff check .

stop:
	-$(BIN)/pymk kafka stop

clean: stop
	rm -rf .pymk reports
