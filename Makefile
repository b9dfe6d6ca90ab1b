# One command each: `make demo` (set up + the main job), `make test` (set up + the test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo test clean

# torch 2.13.0 first: its CPU build is what a bare `pip install torch` would not pick. torchtitan 0.3.0 without its
# dependencies: it pins datasets<4.8, which pins huggingface-hub<2, which transformers 5 refuses; the tests use its
# models and parallelisms only (what they import is in [test]), not its data loading.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,onnx,demo,viewers]'
	$(BIN)/python -m pip install -q --no-deps torchtitan==0.3.0
	touch $(STAMP)

setup: $(STAMP)

# The browser tests open the viewers in Debian's Chromium. As root with apt-get (CI) it is installed
# here; elsewhere, without it, those tests skip and say why.
browser:
	@if ! { command -v chromium && command -v chromedriver; } >/dev/null && command -v apt-get >/dev/null \
	   && [ "$$(id -u)" = 0 ]; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	  || echo "make: installing chromium failed; the browser tests will skip"; \
	fi

demo: setup
	$(BIN)/nmcompile demo

test: setup browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
