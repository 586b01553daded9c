# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if missing, installs the package, runs the LASER demo end to end
#   make test   creates .venv if missing, installs the package with test extras, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s3prl-laser-installed

.PHONY: demo test lint bench clean

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m s3prl_laser.finetune --upstream hubert --demo --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/softdtw.py

clean:
	rm -rf $(VENV) runs build *.egg-info
