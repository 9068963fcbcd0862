# Two entry points: `make demo` (the demo pipeline end to end) and `make test` (the tests).
# Both create .venv and install the package first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
PYTEST_ARGS ?=

.PHONY: install demo demo-seeds test test-slow bench bench-demo clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/snakemake --cores $(CORES) results/tables.md

demo-seeds: install  # the demo's tables with three student seeds: mean ± std in every cell
	$(BIN)/snakemake --cores $(CORES) results/tables.md --config 'seeds=[0,1,2]'

test: install
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install  # the end-to-end DAGs, SLURM, MLflow server, multi-process (.ci/run runs them)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/bench_statistics.py
	$(BIN)/python bench/bench_distill_step.py
	$(BIN)/python bench/bench_launch.py
	$(BIN)/python bench/bench_small_conv.py
	$(BIN)/python bench/bench_cpu_steps.py

bench-demo: install  # the demo from scratch in a fresh copy of HEAD: wall time, per-rule job times
	$(BIN)/python bench/bench_demo.py --run --cores $(CORES)

clean-demo:
	rm -rf results resources .snakemake
