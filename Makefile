# Two entry points (README): `make demo` runs the offline end-to-end job, `make test` the suite.
# Both create .venv on first use and install into it once; later runs install nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pins the PyTorch build so no resolver swaps it; GPU users may pass TORCH_PINS= to keep their own.
TORCH_PINS ?= constraints.txt
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# OpenMP threads that spin while waiting make PyTorch 10x slower on CPU whenever another process shares the
# cores; passive waiting costs nothing measurable on an idle machine.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test test-fast install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_PINS),-c $(TORCH_PINS)) torch torchvision
	$(PY) -m pip install -q $(if $(TORCH_PINS),-c $(TORCH_PINS)) -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py $(if $(FRESH),--fresh) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
