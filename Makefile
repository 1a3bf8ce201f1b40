# Two entry points (see README): `make demo` and `make test`. Both create/reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RESULTS ?= results/demo

.PHONY: setup demo ablation test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev,torch]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m iaca_jax.experiments --mode=demo --results_dir=$(RESULTS)

test: setup
	$(PY) -m pytest -q -n 2 --durations=15 tests

bench: setup
	$(PY) bench/train_step.py
	$(PY) bench/input_pipeline.py

clean:
	rm -rf $(VENV) results

ablation: setup
	$(PY) -m iaca_jax.experiments --mode=ablation --results_dir=$(RESULTS)
