# One command per job; each sets up what it needs (a local virtual environment with a CPU torch and this package).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; override e.g. TORCH_SPEC="torch==2.6.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
# A second transformers line (5.2.x) used by the cross-version tests, installed beside the main one.
TF52_DIR ?= $(VENV)/tf52

.PHONY: setup demo quickstart test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[train,dev,index]"
	touch $@

$(TF52_DIR)/.installed: $(VENV)/.installed
	$(VENV)/bin/pip install -q --target $(TF52_DIR) "transformers==5.2.*"
	touch $@

setup: $(VENV)/.installed

demo: $(VENV)/.installed
	OMP_NUM_THREADS=2 $(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no examples/run_vqa.py

quickstart: $(VENV)/.installed
	$(VENV)/bin/python examples/quickstart.py

test: $(VENV)/.installed $(TF52_DIR)/.installed
	MPLUG_TF52_PATH=$(abspath $(TF52_DIR)) $(VENV)/bin/python -m pytest -q --durations=12 tests --doctest-modules src/transformers_mplug

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests examples conversion

clean:
	rm -rf $(VENV) build src/*.egg-info
