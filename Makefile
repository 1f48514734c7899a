# make test  : create .venv if missing (torch==2.13.0 first, only when no torch is importable),
#              install fastrnn with its test extra, run the test suite.
# make bench : same environment with the bench extra, then the quick benchmark suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: test bench env clean

$(PY):
	$(PYTHON) -m venv $(VENV)

env: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"

test: env
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pytest -q tests

bench: env
	$(PY) -m pip install -q -e ".[bench]"
	$(VENV)/bin/fastrnn-bench --quick

clean:
	rm -rf $(VENV) build *.egg-info
