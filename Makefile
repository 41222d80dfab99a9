# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    the main job: set up, then train the tiny model on the bundled corpus
#   make test   set up, then the CPU test suite (what CI runs)
# Python 3.12: a pyenv-installed 3.12 if there is one (pyenv's shim refuses versions not selected), else python3.12.
PYTHON ?= $(or $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12))),python3.12)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test gpu-wheels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.11.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m falcon_h1.train

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Wheels the GPU machine image lacks (megatron-core, mamba-ssm, causal-conv1d, fiddle), into .whl/.
gpu-wheels: $(VENV)/.installed
	PY=$(PY) bash ../shared/device/wheels.sh
