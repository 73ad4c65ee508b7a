# metanet: `make demo` runs the main job end to end, `make test` runs the tests.
# Both create .venv on first use (torch 2.13.0 CPU, torch-scatter built against it, metanet).
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2
# Idle OpenMP workers must sleep, not spin: spinning halves throughput on a shared 2-core machine.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test test-native bench lint docs clean

setup:
	bash scripts/setup.sh $(VENV)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q -p no:cacheprovider
	METANET_SCATTER_BACKEND=native $(PY) -m pytest -q -p no:cacheprovider -m native_backend

bench: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check metanet scripts tests

# API reference from the docstrings + the pages under docs/, into site/; warnings are errors
docs: setup
	$(PY) -m pip install -q -e ".[docs]"
	$(PY) -m mkdocs build --strict -d site

clean:
	rm -rf $(VENV) .cache runs lightning_logs
