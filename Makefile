# Each target does its own set-up, so both work on a fresh machine:
#   make demo   fp8lab compare: BF16 vs FP8 on the embedded corpus, verdict and report (CPU, a few minutes)
#   make test   the test suite (CPU; GPU tests are skipped without a GPU), ~11 minutes on 2 cores
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

# Two workers, a test file each at a time (its module fixtures are built once): most tests wait
# on child processes, so the second core is otherwise idle.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Two seeds of each recipe: BF16's seed-to-seed spread is the noise band the FP8 gap is judged against.
demo: $(STAMP)
	$(BIN)/fp8lab compare -c configs/demo.toml --recipes bf16,fp8-tensorwise --seeds 2 --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
