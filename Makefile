# Set-up happens here: a local virtual environment with the CPU build of torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]' 'torch==2.13.0'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/lens dissect "Hello World" --plot runs/dissect
	$(BIN)/python experiments/induction_heads.py --out runs/induction

bench: $(STAMP)
	for b in forward peers llama gemma2 patching tl_patching generate harvest; do $(BIN)/python bench/bench_$$b.py || exit 1; done

clean:
	rm -rf $(VENV)
