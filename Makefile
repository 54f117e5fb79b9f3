# Two entry points (see README): `make run` runs the pipeline, `make test` runs the tests.
# Both set up everything they need first: a project-local venv, the offline weights, the default data.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup run test test-fast bench clean-venv

setup: $(VENV)/.installed $(FASHION_MNIST)
	@$(PY) -m transfer_learning.backbone.offline_weights

$(VENV)/.installed: requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Debian ships Fashion-MNIST; without it, prepare falls back to torchvision's download.
$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "note: dataset-fashion-mnist not installed; prepare will try torchvision's download"; \
	else echo "note: not root or no apt-get; prepare will try torchvision's download of Fashion-MNIST"; fi

# `make run SOURCE=<folder or CSV>`: the pipeline on your own images, used whole. data.source in params.yaml becomes
# SOURCE (a folder or CSV as its absolute path), and prepare re-reads it even when params.yaml already said so: DVC
# tracks params.yaml, not the files of your folder, so images added since the last run would go unseen otherwise.
# `make run` alone runs what params.yaml says (the demo, Fashion-MNIST, until a SOURCE is set).
SOURCE ?=
run: setup
ifneq ($(strip $(SOURCE)),)
	@$(PY) -m transfer_learning.data.set_source "$(SOURCE)"
	dvc repro --force prepare
endif
	dvc repro

# pytest-xdist with three workers on two cores: the end-to-end tests wait on dvc, git and torchrun subprocesses, so
# two workers left a core idle a fifth of the time (6 min 31 s; three: 5 min 57 s). Longest tests first
# at the head of each worker's share (tests/longest_first.py), so the long ones do not end the run alone. One
# BLAS/OpenMP thread per worker (and per stage it starts): OpenBLAS threads otherwise spin waiting for a core another
# worker holds (a logistic head's fit measured 9 s instead of 0.3 s)
# Bytecode is cached even where the shell sets PYTHONDONTWRITEBYTECODE: every Python process the suite
# starts (stages, dvc, torchrun ranks) would otherwise compile the project's modules again, and each
# worker would rewrite the tests' assertions again.
TEST_ENV := OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
test: setup
	env -u PYTHONDONTWRITEBYTECODE $(TEST_ENV) $(PY) -m pytest -q -n 3 --dist worksteal -m "slow or not slow" tests

test-fast: setup
	env -u PYTHONDONTWRITEBYTECODE $(TEST_ENV) $(PY) -m pytest -q -n auto --dist worksteal -m "not slow" tests

bench: setup
	$(PY) benchmarks/extract_throughput.py
	$(PY) benchmarks/heads_vs_extract.py
	dvc repro && $(PY) benchmarks/reference_linear_probe.py
	$(PY) benchmarks/finetune_prefix_cache.py
