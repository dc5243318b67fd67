# The two commands of the README. Both create (or reuse) .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install browser clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision are pinned here (the machine's local builds); pyproject keeps ranges.
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	# FAISS: the cpu extra here; a GPU machine installs '.[gpu,dev]' instead (README).
	$(PY) -m pip install -q -c constraints.txt -e '.[cpu,dev]'
	touch $(STAMP)

# The distribution's Chromium and its driver for the serve page's browser test (Selenium drives them; no tool may
# download a browser build of its own). Skipped when both are there; as root apt installs them (CI), otherwise a
# warning says how and the browser test skips.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "warning: no /usr/bin/chromium: run 'sudo apt-get install chromium chromium-driver' for the browser test"; fi

install: $(STAMP) browser

demo: $(STAMP)
	$(VENV)/bin/ssl-vit compare --recipe recipes/compare_cifar10_subset.yaml

test: $(STAMP) browser
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf runs .pytest_cache
