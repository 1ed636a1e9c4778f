# Two commands after cloning:  make demo   (the main job)   and   make test   (the test suite).
# Both create .venv and install everything themselves; constraints.txt keeps torch on the
# CPU wheel so set-up takes a minute, not several GB of CUDA downloads.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip install -q -c constraints.txt

# `make test-min`: the same install in $(VENV_MIN) with every dependency at exactly its
# pyproject.toml floor (constraints-min.txt, which also pins torch to the CPU wheel), then the
# fast part of the suite; CI runs it after `make test`, which is what proves the floors.
VENV_MIN ?= .venv-min
PIP_MIN   = $(VENV_MIN)/bin/python -m pip install -q -c constraints-min.txt
# left out of the minimum-versions run: `slow` tests, torch.compile, multi-process training and
# the process-kill / disk-full tests (minutes of compiling and of child processes that check torch
# and the operating system, and torch is at the same 2.13.0 in both environments)
FAST      = -m "not slow" --ignore=tests/test_compile.py --ignore=tests/test_distributed.py \
            --ignore=tests/test_crash.py -k "not kill"

.PHONY: demo test test-min lint install clean

$(VENV)/.installed: pyproject.toml constraints.txt $(wildcard plugins/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[test,train]" -e plugins/tensadapt-tensor-ring -e plugins/tensadapt-gpt-neo
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/tensadapt demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

$(VENV_MIN)/.installed: pyproject.toml constraints-min.txt $(wildcard plugins/*/pyproject.toml)
	$(PYTHON) -m venv $(VENV_MIN)
	$(PIP_MIN) -e ".[test,train]" -e plugins/tensadapt-tensor-ring -e plugins/tensadapt-gpt-neo
	touch $@

test-min: $(VENV_MIN)/.installed
	TENSADAPT_MIN_VERSIONS=1 $(VENV_MIN)/bin/python -m pytest -q -n 2 --dist loadgroup $(FAST)

lint: $(VENV)/.installed
	$(BIN)/ruff check tensadapt tests && $(BIN)/ruff format --check tensadapt && $(BIN)/mypy

clean:
	rm -rf $(VENV) $(VENV_MIN) .pytest_cache .mypy_cache .ruff_cache .hypothesis
