# bnserve: two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
BNSERVE := $(VENV)/bin/bnserve
HOST   ?= 0.0.0.0
PORT   ?= 8001
METRICS_PORT ?= 8002

.PHONY: serve serve-native native test lint typecheck unit models export-models lock proto clean install-serve install-test bench bench-quick bench-floor soak

# Every package comes from a lock with hashes (pip-tools; `make lock` refreshes them): the serving
# install from requirements-serve.txt, the test install from requirements-test.txt (a superset,
# resolved with the serving lock as a constraint, so the shared packages agree). bnserve itself
# goes in last, without dependencies and without build isolation: its build backend
# (setuptools) is in the lock too.
SERVE_LOCK := requirements-serve.txt
TEST_LOCK  := requirements-test.txt
LOCKED := $(PIP) install --require-hashes -r
SELF   := $(PIP) install --no-deps --no-build-isolation

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Serving install: no torch. The stamp is remade whenever pyproject.toml or the lock changes.
# editable_mode=strict: a tree of links under build/, which mypy and every tool can follow.
EDITABLE := --config-settings editable_mode=strict
SOURCES := $(shell git ls-files '*.py' 2>/dev/null)
# Every shipped module under its installed name (server/codec.py -> bnserve.server.codec).
MYPY_MODULES := $(shell git ls-files 'server/*.py' 'client/*.py' 'training/*.py' 'proto/*.py' cli.py \
	| grep -v '_pb2' | sed -e 's/\.py$$//' -e 's/\/__init__$$//' -e 's/\//./g' -e 's/^/-m bnserve./')

# The bench scripts are checked as files. The checkout's root is the package `bnserve` (it holds
# __init__.py), so without explicit package bases mypy would name them after the checkout's
# directory, and refuse one that is no Python identifier (mktemp's tmp.XXXX).
MYPY_BENCH = $(VENV)/bin/mypy --explicit-package-bases bench/suite.py bench/soak.py bench/floor.py

$(VENV)/.serve-stamp: pyproject.toml $(SERVE_LOCK) $(SOURCES) | $(PY)
	$(LOCKED) $(SERVE_LOCK)
	$(SELF) $(EDITABLE) -e .
	touch $@

# Test install: training (torch==2.13.0, CPU wheel) and test tools on top.
$(VENV)/.test-stamp: pyproject.toml $(TEST_LOCK) $(SOURCES) | $(PY)
	$(LOCKED) $(TEST_LOCK)
	$(SELF) $(EDITABLE) -e .
	touch $@ $(VENV)/.serve-stamp

install-serve: $(VENV)/.serve-stamp
install-test: $(VENV)/.test-stamp

# The native front end is built first and serves by default (`--frontend auto`); if it cannot
# be built here, the Python front end serves and the log says why.
serve: install-serve
	@$(MAKE) --no-print-directory native || \
		echo "make serve: the native front end did not build (see above): the Python one serves"
	$(BNSERVE) serve --repo model_repository --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

# The native (C++) front end, build/native/bnserve_native (server/native_frontend.py, docs/native.md):
# gRPC C++ from Debian and the venv's onnxruntime library. Idempotent: apt-get only for what is
# missing (needs root then), recompiles only what changed.
native: install-serve
	VENV=$(abspath $(VENV)) bash server/native/build.sh

serve-native: native
	$(BNSERVE) serve --frontend native --repo model_repository --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install-test
	$(VENV)/bin/mypy $(MYPY_MODULES)
	$(MYPY_BENCH)

unit: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

test: install-test native
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(MYPY_MODULES)
	$(MYPY_BENCH)
	$(PY) -m pytest $(PYTEST_ARGS)

# Re-resolve both locks from pyproject.toml; pins are kept unless pyproject needs otherwise, or
# LOCK_ARGS=--upgrade (every package to its newest allowed release). The self-reference
# `bnserve[train]` in the test extra comes out as an unhashable `bnserve @ file://` line: dropped.
LOCK_FLAGS := --quiet --generate-hashes --allow-unsafe --strip-extras --all-build-deps \
	--no-emit-index-url --no-emit-find-links
lock: install-test
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) $(LOCK_ARGS) -o $(SERVE_LOCK) pyproject.toml
	$(VENV)/bin/pip-compile $(LOCK_FLAGS) $(LOCK_ARGS) --extra test --constraint $(SERVE_LOCK) \
		-o $(TEST_LOCK) pyproject.toml
	sed -i -e '/^# WARNING: pip install will require the following package to be hashed/,/^    # via file:/d' \
		$(TEST_LOCK)

# Retrain the bundled models, keep their checkpoints and export from them (docs/reproducibility.md:
# the same bytes on the CPU that trained them); export-models re-exports the committed
# checkpoints (the same bytes on any machine).
models: install-test
	$(PY) -m bnserve.training.bundle --repo model_repository

export-models: install-test
	$(PY) -m bnserve.training.bundle --repo model_repository --from-checkpoint

# Regenerate the protobuf/gRPC modules in proto/ from proto/inference.proto.
proto: install-test
	$(PY) -m bnserve.proto.generate

# The performance suite (not part of `make test`): server vs in-process onnxruntime, writes
# docs/performance.md and its plots. bench-quick runs in under 2 minutes.
bench: install-test
	$(PY) bench/suite.py $(BENCH_ARGS)

bench-quick: install-test
	$(PY) bench/suite.py --quick

# What the native server's vol3d CPU ratio is made of (about 2 minutes).
bench-floor: install-test native
	$(PY) bench/floor.py

# 10 minutes of mixed unary and streaming load: nothing lost or answered twice, RSS flat.
soak: install-serve
	$(PY) bench/soak.py --seconds 600

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
