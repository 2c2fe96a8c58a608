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

# SAELens pins transformer-lens < 4: its parity tests (tests/test_sae.py) run in an environment
# of their own; in the main one they skip.
SAE_VENV := .venv-sae
SAE_STAMP := $(SAE_VENV)/.installed

$(SAE_STAMP): pyproject.toml
	$(PY) -m venv $(SAE_VENV)
	$(SAE_VENV)/bin/pip install --quiet --upgrade pip
	$(SAE_VENV)/bin/pip install --quiet torch==2.13.0
	$(SAE_VENV)/bin/pip install --quiet -e '.[test,sae]' 'torch==2.13.0'
	touch $(SAE_STAMP)

test: $(STAMP) $(SAE_STAMP)
	$(BIN)/python -m pytest -n 2 -q
	$(SAE_VENV)/bin/python -m pytest -n 2 -q tests/test_sae.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/lens dissect "Hello World" --plot runs/dissect
	$(BIN)/python experiments/sae_features.py "Hello World" --out runs/sae
	$(BIN)/python experiments/induction_heads.py --out runs/induction

bench: $(STAMP)
	for b in forward peers llama gemma2 patching tl_patching patterns sae generate harvest; do $(BIN)/python bench/bench_$$b.py || exit 1; done

clean:
	rm -rf $(VENV) $(SAE_VENV)
