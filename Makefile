# slimexport — common tasks. PYTHON can point at a virtual environment's interpreter.
PYTHON ?= python3
SUITE ?= quick

.PHONY: install test lint benchmark demo clean

install:  ## install slimexport with its test tools (editable)
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## the whole test suite (a few minutes on two cores)
	$(PYTHON) -m pytest tests

lint:
	$(PYTHON) -m ruff check slimexport tests benchmarks

benchmark:  ## SUITE=quick (CPU, minutes) or SUITE=full (reference architectures on CIFAR-10, for a GPU)
	$(PYTHON) benchmarks/run.py --suite $(SUITE)

demo:  ## the main job on the embedded data
	$(PYTHON) -m slimexport pipeline --out runs/demo --force

clean:
	rm -rf runs .pytest_cache .ruff_cache build dist *.egg-info
