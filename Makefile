# spingen: `make test` and `make demo` set themselves up on a fresh machine (idempotent).
VENV    ?= .venv
PYTHON  ?= python3
STAMP   := $(VENV)/.installed
export PATH := $(abspath $(VENV))/bin:$(PATH)
export OMP_NUM_THREADS ?= 1

.PHONY: test demo docs install

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/install_gpaw.sh
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	bash scripts/install_gpaw.sh $(VENV)
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -x tests

docs: $(STAMP)
	$(VENV)/bin/python scripts/write_docs.py

DEMO    := param_examples/linio2_demo/param.json
demo: $(STAMP)
	$(VENV)/bin/spingen check $(DEMO) machine_examples/local.json
	$(VENV)/bin/spingen run $(DEMO) machine_examples/local.json -w demo_work
	$(VENV)/bin/spingen status demo_work
	$(VENV)/bin/spingen plot demo_work -o demo_work/report.png
