# The two commands of the README. Both create (or reuse) .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision are pinned here (the machine's local builds); pyproject keeps ranges.
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	# FAISS: the cpu extra here; a GPU machine installs '.[gpu,dev]' instead (README).
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ssl-vit compare --recipe recipes/compare_cifar10_subset.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
