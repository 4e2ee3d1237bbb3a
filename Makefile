# The README's two commands: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv and install the pinned stack on a fresh machine with only Python.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test pretrain check-models clean

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/pulid-lab world --out figures/toyfaces.png
	$(BIN)/pulid-lab check-models

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

pretrain: $(STAMP)
	$(BIN)/pulid-lab pretrain --profile paper --out pulid_lab/shipped --resume

clean:
	rm -rf $(VENV)
