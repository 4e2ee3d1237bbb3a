# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv and install the pinned stack on a fresh machine with only Python.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-compat lab pretrain check-models clean

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# the main job: Table 2 of the paper in the mini world (quick profile, 1 seed), from the trained stages that ship with
# the models (add --train to retrain them, about 1.6 h on 2 cores); its measured time is in the README;
# the full one: `$(BIN)/pulid-lab reproduce --profile paper --seeds 3 --out runs/reproduce-paper --figures figures/paper`
demo: $(STAMP)
	$(BIN)/pulid-lab world --out figures/toyfaces.png
	$(BIN)/pulid-lab reproduce --profile quick --seeds 1 --out runs/reproduce --figures figures

# unit tests (two processes, one file each at a time, one torch thread each), then every notebook top to bottom
# under nbval in smoke mode (CI=true selects the smoke profile)
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests
	CI=$${CI:-true} $(BIN)/python -m pytest -q --durations=10 --nbval-lax --nbval-current-env \
		--nbval-sanitize-with notebooks/nbval_sanitize.cfg notebooks

# our attention processors inside diffusers UNets of every attention block type (also part of `make test`)
test-compat: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_diffusers_compat.py

# the lessons in JupyterLab, with the project's environment
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

pretrain: $(STAMP)
	$(BIN)/pulid-lab pretrain --profile paper --out pulid_lab/shipped --resume

check-models: $(STAMP)
	$(BIN)/pulid-lab check-models

clean:
	rm -rf $(VENV)
