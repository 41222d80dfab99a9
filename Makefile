# Two commands do all the set-up on a fresh machine (see README.md):
#   make run    the main job: set up, then train the tiny model on the bundled corpus
#   make test   set up, then the CPU test suite (what CI runs)
# Python 3.12: a pyenv-installed 3.12 if there is one (pyenv's shim refuses versions not selected), else python3.12.
PYTHON ?= $(or $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12))),python3.12)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test gpu-wheels system-packages

# Debian packages of the Slurm tests: a one-node Slurm cluster (slurm-wlm, munge) and a login node
# over SSH (openssh-server, rsync) on 127.0.0.1. Installed when missing on a Debian machine where
# this is root (CI); elsewhere those tests say why they skip.
SYSTEM_PACKAGES := slurm-wlm munge openssh-server rsync

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.11.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m falcon_h1.train

system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $$missing (Debian packages of the Slurm tests)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; }; \
	fi

# Two workers (CI has 2 cores; most tests wait on process start-up more than on compute), each
# test file whole on one worker: the Slurm and SSH services a file starts serve only its tests.
test: $(VENV)/.installed system-packages
	$(PY) -m pytest -q -n 2 --dist loadfile

# Wheels the GPU machine image lacks (megatron-core, mamba-ssm, causal-conv1d, fiddle), into .whl/.
gpu-wheels: $(VENV)/.installed
	PY=$(PY) bash ../shared/device/wheels.sh
