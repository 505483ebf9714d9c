# make demo: set everything up, run a short replication on the embedded broker.
# make test: set everything up, run the whole test suite.
VENV    ?= .venv
PYTHON  ?= python3
STAMP   := $(VENV)/.installed

.PHONY: setup system demo test unit bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

system:
	@bash scripts/setup-system.sh

setup: $(STAMP) system
	@$(VENV)/bin/x2x broker fetch

demo: setup
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh

test: setup
	$(VENV)/bin/pytest -q -ra --durations=15

unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

bench: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m bench

bench-quick: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/python -m bench --quick

clean:
	rm -rf $(VENV) demo-data .pytest_cache .hypothesis *.egg-info
