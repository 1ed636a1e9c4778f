# Two commands after cloning:  make demo   (the main job)   and   make test   (the test suite).
# Both create .venv and install everything themselves; constraints.txt keeps torch on the
# CPU wheel so set-up takes a minute, not several GB of CUDA downloads.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml constraints.txt $(wildcard plugins/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[test,train]" -e plugins/tensadapt-tensor-ring -e plugins/tensadapt-gpt-neo
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/tensadapt demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

lint: $(VENV)/.installed
	$(BIN)/ruff check tensadapt tests && $(BIN)/ruff format --check tensadapt && $(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
