# One command each: `make demo` (set up + the main job), `make test` (set up + the test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test clean

# torch 2.13.0 first: its CPU build is what a bare `pip install torch` would not pick.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,onnx,demo]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/nmcompile demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
