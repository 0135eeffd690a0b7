# The two commands a user needs: `make demo` and `make test`. Both install first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install test demo parity clean

install: $(STAMP)

# torch==2.13.0 goes in first and alone: here it is a local CPU wheel, and installing it before anything that
# depends on torch stops pip from resolving a CUDA build with gigabytes of packages.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	@# setuptools' "Editable installation" BuildBackendWarning is advice for its own developers, not ours
	PYTHONWARNINGS=ignore $(PIP) install -q -e ".[test]"
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q

parity: install
	$(PY) -m pytest -q -m parity

demo: install
	$(PY) jobs/demo.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
