# Two entry points (README): `make demo` runs the offline end-to-end job, `make test` the suite.
# Both create .venv on first use and install into it once; later runs install nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pins the PyTorch build so no resolver swaps it; GPU users may pass TORCH_PINS= to keep their own.
TORCH_PINS ?= constraints.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# OpenMP's wait policy. Spinning between parallel regions (the default) is what a process alone on the cores
# wants: measured on 2 cores, the demo's tokenizer steps ran 1.7-1.8x and its DiT steps 1.6x faster than with
# OMP_WAIT_POLICY=PASSIVE (same numbers). Two compute processes sharing the cores are the opposite case: spinning
# made both 3x slower than passive. The demo runs alone; the suite, which starts processes beside its own, waits
# passively.

.PHONY: demo test test-fast install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_PINS),-c $(TORCH_PINS)) torch torchvision
	$(PY) -m pip install -q $(if $(TORCH_PINS),-c $(TORCH_PINS)) -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py $(if $(FRESH),--fresh) $(DEMO_ARGS)

test: export OMP_WAIT_POLICY ?= PASSIVE
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: export OMP_WAIT_POLICY ?= PASSIVE
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
