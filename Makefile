# The two commands of the README: `make demo` and `make test`. Both set up what
# they need: a .venv with the pinned requirements and Debian's Fashion-MNIST.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_WORKDIR ?= runs/demo
# Test processes (pytest-xdist); each test file stays in one process so its module fixtures
# compile once. 0 runs everything in this process.
TEST_WORKERS ?= 2

.PHONY: demo test lint format setup data bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Fashion-MNIST comes from Debian (package dataset-fashion-mnist); nothing is
# downloaded at run time.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing from $(FMNIST_DIR)."; \
	  echo "Install it with:  sudo apt-get install dataset-fashion-mnist"; \
	  echo "(or point --config.data.path at a folder with the four *-ubyte.gz files)"; exit 1; \
	fi

test: setup data
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# The one formatting and lint style (ruff.toml) and the type check of sslx/ (mypy.ini);
# `make format` rewrites files to the style.
lint: setup
	$(VENV)/bin/ruff format --check --diff .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: setup data
	$(PY) experiments/fashion_mnist/demo.py --workdir=$(DEMO_WORKDIR)

bench: setup
	$(PY) experiments/bench.py --config=configs/dino.py:fashion_mnist

clean:
	rm -rf $(DEMO_WORKDIR)
