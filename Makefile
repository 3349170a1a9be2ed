# The two commands a new user runs: `make pretrain` and `make test`.
# Each creates .venv and installs the project on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: pretrain test reliability install clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(INSTALLED)

pretrain: $(INSTALLED)
	$(BIN)/ssl-pretrain train --config tiny-cpu

test: $(INSTALLED)
	$(BIN)/python -m pytest --durations=25 $(PYTEST_ARGS)

# The whole reliability and security suite, long variants included (docs/reliability.md).
reliability: $(INSTALLED)
	$(BIN)/python -m pytest -m reliability --full $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
