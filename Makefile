# softswap: two entry points. `make demo` sets up .venv and runs the main job; `make test` runs the suite.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/softswap demo

test: $(STAMP)
	TVM_NUM_THREADS=$${TVM_NUM_THREADS:-2} $(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
