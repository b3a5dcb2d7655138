# Set-up and the two everyday commands. `make run`: the embedded default end to end.
# `make test`: the linter, the test suite, then the nih-512 rehearsal (benchmarks/rehearsal.py, ~25 min on
# 2 cores); `make lint` and `make unit` run the linter and the test suite alone. All create .venv and install everything on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install run test lint unit rehearsal benchmarks figures
install: $(VENV)/.installed

# torch==2.13.0 is the CPU build (the plain name would pull a multi-GB CUDA build);
# torchxrayvision is installed without deps: only its data files (real NIH metadata, lung masks) are read.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps torchxrayvision
	touch $@

run: install
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

test: lint unit rehearsal

lint: install
	$(BIN)/ruff check src stages tests benchmarks

unit: install
	PATH="$(abspath $(BIN)):$$PATH" python -m pytest

rehearsal: install
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/rehearsal.py

# The documentation's figures, copied from the last run's reports/ (after `make run`).
figures:
	for branch in clip_text clip_vision elixr; do \
	  cp reports/samples/$$branch/original_vs_generated_6.png docs/figures/$${branch}_original_vs_generated_6.png; done
	cp reports/samples/clip_text/one_row_per_finding.png docs/figures/clip_text_one_row_per_finding.png
	cp reports/evaluate/clip_text/pca.png docs/figures/clip_text_pca.png
	cp reports/utility/clip_text/auroc.png docs/figures/clip_text_utility_auroc.png
	cp reports/training_curves.png docs/figures/training_curves.png

benchmarks: install
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/prepare_benchmark.py
	PATH="$(abspath $(BIN)):$$PATH" python benchmarks/phantom_separability.py
