"""Test-wide settings: CPU, offline, one thread, Triton kernels through the interpreter where there is no GPU."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # read by triton.jit when gdpo.advantage.triton_kernel is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SESSION_LAUNCHER_ENV = {k: os.environ.get(k) for k in _LAUNCHER_VARS}  # as the session started


@pytest.fixture(autouse=True)
def _no_launcher_env_leaks():
    """In-process tests make this process a world of one, which sets the launcher variables (MASTER_PORT is
    the port of a store this process still holds). Take them out again after each test, so a subprocess started
    later (train.py, a torchrun rank) does not inherit them and try to bind that port. The values go back to
    the session's start, not to the test's: a module-scoped fixture that trained in-process ran before this."""
    yield
    for k, v in _SESSION_LAUNCHER_ENV.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _no_zero3_linear_leak():
    """Building a ZeRO-3 engine replaces torch.nn.functional.linear for the whole process (DeepSpeed's
    memory-efficient linear, whose backward rounds differently from torch's). Put torch's back after each test,
    so a later in-process run trains exactly as a fresh process does (test_resume_equals_uninterrupted compares
    the two bit for bit)."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear
