# Two commands: `make demo` (set up, then ETL + training on the embedded data) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (a local wheel on the project's machines); on a CUDA box pass e.g.
# `make demo TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.ctrflow-installed

.PHONY: demo test setup lint clean gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python etl/run.py --overwrite
	$(BIN)/python train/fit.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The prepared GPU check (issue #18): tests, loader, training and serving figures on one GPU in < 8 min.
# On the device machine (no venv there): python3 bench/gpu_check.py --out $OUT
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py --out $${OUT:-$$(mktemp -d)}

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf data runs
