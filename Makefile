# Two commands do everything on a fresh machine:  make demo   and   make test
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-projectile test bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# the main job: ZO-SOL, a PDE corrector trained through the black-box PhiFlow solver (~6 min, 2 CPU cores)
demo: $(STAMP)
	$(VENV)/bin/bbzo sol run --preset demo --out runs/sol-demo --overwrite

# the first demo: a launch policy trained through a numpy projectile simulator (~3 min)
demo-projectile: $(STAMP)
	$(VENV)/bin/bbzo demo --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/cge_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
