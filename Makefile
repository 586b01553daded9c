# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if missing, installs the package, runs the LASER demo end to end
#   make test   creates .venv if missing, installs the package with test extras, runs the test suite
#   make gpu-check  on a GPU machine: kernels vs the reference, soft-DTW vs pysdtw, fine-tuning speed and
#                   memory per preset (benchmarks/gpu_check.py; about 5-8 minutes; report in runs/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s3prl-laser-installed

.PHONY: demo test lint bench gpu-check clean

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

# the bench extra (pysdtw) only where it fits what is installed: nothing installed changes; if it cannot be
# added, the report says pysdtw is not installed
gpu-check: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v ' @ ' > $(VENV)/installed-constraints.txt
	-$(PY) -m pip install --quiet -c $(VENV)/installed-constraints.txt -e '.[bench]'
	$(PY) benchmarks/gpu_check.py --out runs/gpu_check.json

clean:
	rm -rf $(VENV) runs build *.egg-info
