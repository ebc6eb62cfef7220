# Each target does its own set-up, so both work on a fresh machine:
#   make demo   train the debug model on the embedded corpus in BF16 and FP8 (CPU, a few minutes)
#   make test   the test suite (CPU; GPU tests are skipped without a GPU)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test setup clean

setup: $(STAMP)

# torch is installed first and alone: with the pin in constraints.txt pip takes the CPU
# wheel that lies on this disk instead of resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/fp8lab train -c configs/demo.toml --precision.recipe=bf16 --run-dir $(DEMO_DIR)/bf16
	$(BIN)/fp8lab train -c configs/demo.toml --precision.recipe=fp8-tensorwise --run-dir $(DEMO_DIR)/fp8-tensorwise
	$(BIN)/fp8lab show $(DEMO_DIR)/bf16 $(DEMO_DIR)/fp8-tensorwise

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
