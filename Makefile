# Two commands do all the set-up on a fresh machine, on the current lane (ESPnet's s3prl, today's torch):
#   make demo   creates .venv if missing, installs the package, runs the LASER demo end to end
#   make test   creates .venv if missing, installs the package with test extras, runs ruff and the test suite
#   make gpu-check  on a GPU machine: kernels vs the reference, soft-DTW vs pysdtw, fine-tuning speed and
#                   memory per preset (benchmarks/gpu_check.py; about 5-8 minutes; report in runs/)
# The classic lane (PyPI's s3prl 0.4.18, torch 2.8) goes into its own venv:
#   make LANE=classic test     (venv .venv-classic)
# pip's output goes to $(VENV)/pip.log; its errors (and the log's tail on failure) still reach the screen.
PYTHON ?= python3
LANE ?= current
VENV ?= $(if $(filter current,$(LANE)),.venv,.venv-$(LANE))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s3prl-laser-installed
PYTEST_ARGS ?=

.PHONY: demo test lint bench gpu-check clean

$(STAMP): setup.cfg setup.py pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing s3prl-laser[$(LANE),test] into $(VENV) (pip log: $(VENV)/pip.log)"
	@$(PY) -m pip install -e '.[$(LANE),test]' >$(VENV)/pip.log 2>&1 \
		|| { tail -n 30 $(VENV)/pip.log; echo "pip install failed: full log in $(VENV)/pip.log"; exit 1; }
	@grep '^ERROR' $(VENV)/pip.log || true  # pip reports dependency conflicts as errors, yet exits 0
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m s3prl_laser.finetune --upstream hubert --demo --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[$(LANE),bench]'
	$(PY) benchmarks/softdtw.py

# the bench extra (pysdtw) only where it fits what is installed: nothing installed changes; if it cannot be
# added, the report says pysdtw is not installed
gpu-check: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v ' @ ' > $(VENV)/installed-constraints.txt
	-$(PY) -m pip install --quiet -c $(VENV)/installed-constraints.txt -e '.[bench]'
	$(PY) benchmarks/gpu_check.py --out runs/gpu_check.json

clean:
	rm -rf .venv .venv-classic runs build *.egg-info
