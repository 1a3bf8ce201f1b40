# Two entry points (see README): `make demo` and `make test`. Both create/reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RESULTS ?= results/demo
# glibc malloc keeps freed memory in the process (no mmap, no trimming), so that XLA:CPU does not
# page-fault every step's temporaries in again (docs/PERFORMANCE.md, "Host allocator"; the entry
# points run CPU steps in the main thread, whose arena keeps even the paper-size step's block: "Fusion
# step vs PyTorch"). HOST_MALLOC= leaves glibc alone.
HOST_MALLOC ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615
export GLIBC_TUNABLES = $(HOST_MALLOC)

.PHONY: setup demo ablation claims lint format test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[dev,torch,tpu,beam]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) experiments.py --mode=demo --results_dir=$(RESULTS)

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q -n 2 --dist=loadgroup --no-loadscope-reorder --durations=25 tests

bench: setup
	$(PY) bench/train_step.py
	$(PY) bench/input_pipeline.py

clean:
	rm -rf $(VENV) results

ablation: setup
	$(PY) experiments.py --mode=ablation --results_dir=$(RESULTS)

claims: setup
	$(PY) experiments.py --mode=claims --results_dir=$(RESULTS)
