# Each target installs what it needs into .venv by itself.
VENV   ?= .venv
# The Triton bundled with nvidia-pytriton embeds Debian's libpython3.11 in its Python-backend stub; a
# venv on that same interpreter gives the stub a standard library that matches it.
PYTHON ?= $(shell test -x /usr/bin/python3.11 && echo /usr/bin/python3.11 || echo python3)
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo
PYTEST_ARGS ?=

.PHONY: setup demo test clean image compose-up k8s

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (on disk on our machines): an unpinned torch pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# perf_analyzer: the binary of tritonclient 2.51 runs on Debian 12 with libb64 and libcudart 12.
	command -v apt-get >/dev/null && { dpkg -s libb64-0d >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libb64-0d; }; } || true
	$(PY) -m flux2_klein.client.perf_analyzer --install || echo "warning: no perf_analyzer; bench falls back to tritonclient threads"
	touch $(STAMP)

# Tiny checkpoint -> build the repository -> serve on a real Triton -> generate $(DEMO)/flux2-klein.png.
demo: setup
	$(PY) -m flux2_klein.demo $(DEMO)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Need a Docker engine / kubectl: not available on the project's CI machines.
image:
	docker build -f docker/Dockerfile -t flux2-klein-triton:0.1.0 .
compose-up:
	docker compose -f docker/compose.yaml up
k8s:
	kubectl kustomize deploy/k8s

clean:
	rm -rf $(DEMO) $(VENV)
