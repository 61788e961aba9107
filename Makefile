# Each target installs what it needs into .venv by itself.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (on disk on our machines): an unpinned torch pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Tiny checkpoint -> ONNX export of every network (serving is added on top of this).
demo: setup
	$(VENV)/bin/flux2-klein tiny --out $(DEMO)/checkpoint
	$(VENV)/bin/flux2-klein export onnx --checkpoint $(DEMO)/checkpoint --out $(DEMO)/onnx

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO) $(VENV)
