# Two commands do all the set-up on a fresh machine, on the current lane (ESPnet's s3prl, today's torch):
#   make demo   creates .venv if missing, installs the package, runs the LASER demo end to end
#   make test   creates .venv if missing, installs the package with test extras, runs ruff and the test suite
#   make gpu-check  on a GPU machine: kernels vs the reference, soft-DTW vs pysdtw, the probe end to end,
#                   fine-tuning speed and memory per preset (benchmarks/gpu_check.py; about 10 minutes; report
#                   in runs/)
# The classic lane (PyPI's s3prl 0.4.18, torch 2.8) goes into its own venv:
#   make LANE=classic test     (venv .venv-classic)
# The espnet lane is an ESPnet environment that we join without changing it (venv .venv-espnet):
#   make LANE=espnet test      installs ESPnet from PyPI as its users do, records `pip freeze`, adds the
#                              torchaudio that loads with ESPnet's torch, espnet-s3prl and this package with that
#                              freeze as constraints, and fails if any package ESPnet installed was removed or
#                              changed, or if `pip check` finds a broken requirement (docs/install.md)
# pip's output goes to $(VENV)/pip.log; its errors (and the log's tail on failure) still reach the screen.
PYTHON ?= python3
LANE ?= current
VENV ?= $(if $(filter current,$(LANE)),.venv,.venv-$(LANE))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s3prl-laser-installed
PYTEST_ARGS ?=
# extra pip install options (CI passes --no-compile: its venvs are thrown away, so bytecode is compiled only for
# the modules the tests import)
PIP_FLAGS ?=
# The ESPnet release the espnet lane installs, as its users do (202511 brings torch 2.12.1 and no torchaudio).
ESPNET ?= espnet==202511
# the torchaudio that loads with the installed torch (s3prl_laser/stacks.py, importable from the source tree)
TORCHAUDIO_FOR_TORCH = import importlib.metadata as m, s3prl_laser.stacks as l; \
	r = l.torchaudio_requirement(m.version('torch')); print(r) if r else exit('no torchaudio known for this torch')

.PHONY: demo test lint bench gpu-check clean

ifeq ($(LANE),espnet)
$(STAMP): setup.cfg setup.py pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing $(ESPNET) into $(VENV) as its users do (pip log: $(VENV)/pip.log)"
	@$(PY) -m pip install $(PIP_FLAGS) $(ESPNET) >$(VENV)/pip.log 2>&1 \
		|| { tail -n 30 $(VENV)/pip.log; echo "pip install failed: full log in $(VENV)/pip.log"; exit 1; }
	@$(PY) -m pip freeze --exclude-editable | grep -v ' @ ' > $(VENV)/freeze-before.txt
	@$(PY) -m pip freeze --all --exclude-editable | grep -v ' @ ' > $(VENV)/freeze-all-before.txt
	@torchaudio=$$($(PY) -c "$(TORCHAUDIO_FOR_TORCH)") || exit 1; \
		echo "adding $$torchaudio (loads with ESPnet's torch), espnet-s3prl and s3prl-laser[current,test]," \
			"ESPnet's packages as constraints"; \
		$(PY) -m pip install $(PIP_FLAGS) -c $(VENV)/freeze-before.txt $(ESPNET) "$$torchaudio" -e '.[current,test]' \
			>>$(VENV)/pip.log 2>&1 \
		|| { tail -n 30 $(VENV)/pip.log; echo "pip install failed: full log in $(VENV)/pip.log"; exit 1; }
	@$(PY) -m pip freeze --exclude-editable | grep -v ' @ ' > $(VENV)/freeze-after.txt
	@$(PY) -m pip freeze --all --exclude-editable | grep -v ' @ ' > $(VENV)/freeze-all-after.txt
	@changed=$$(grep -cvxFf $(VENV)/freeze-after.txt $(VENV)/freeze-before.txt); \
		echo "pip freeze: $$(wc -l < $(VENV)/freeze-before.txt) packages after ESPnet's install," \
			"$$(wc -l < $(VENV)/freeze-after.txt) after ours, $$changed of ESPnet's removed or changed"; \
		echo "the venv's own tooling: $$(grep -E '^(pip|setuptools|wheel)==' $(VENV)/freeze-all-before.txt \
			| tr '\n' ' ')-> $$(grep -E '^(pip|setuptools|wheel)==' $(VENV)/freeze-all-after.txt | tr '\n' ' ')"; \
		test "$$changed" = 0 || { grep -vxFf $(VENV)/freeze-after.txt $(VENV)/freeze-before.txt; exit 1; }
	@$(PY) -m pip check
	@touch $(STAMP)
else
$(STAMP): setup.cfg setup.py pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing s3prl-laser[$(LANE),test] into $(VENV) (pip log: $(VENV)/pip.log)"
	@$(PY) -m pip install $(PIP_FLAGS) -e '.[$(LANE),test]' >$(VENV)/pip.log 2>&1 \
		|| { tail -n 30 $(VENV)/pip.log; echo "pip install failed: full log in $(VENV)/pip.log"; exit 1; }
	@grep '^ERROR' $(VENV)/pip.log || true  # pip reports dependency conflicts as errors, yet exits 0
	@touch $(STAMP)
endif

demo: $(STAMP)
	$(PY) -m s3prl_laser.finetune --upstream hubert --demo --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check .
	S3PRL_LASER_LANE=$(LANE) $(PY) -m pytest $(PYTEST_ARGS)

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
	rm -rf .venv .venv-classic .venv-espnet runs build *.egg-info
