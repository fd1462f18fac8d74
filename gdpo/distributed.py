"""Process group + DeepSpeed engine: everything distributed lives in this one module.

`python train.py` runs as a world of one without a launcher: `init_distributed` fills in the env a
launcher would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, and MASTER_PORT from a store bound to port 0). Under
`deepspeed` / `torchrun` those variables already exist and are used as they are.

Why engine start-up is fast on CPU: DeepSpeed's torch comm backend (`deepspeed/comm/torch.py`,
`TorchBackend.__init__` -> `build_shm_op`) JIT-compiles the "deepspeed_shm_comm" C++ op (a
shared-memory all-reduce for multi-process CPU runs) whenever `deepspeed.ops.__compatible_ops__`
marks it compatible, which it always does on Linux; the compile takes 60-110 s. There is no env var
for it (DS_BUILD_OPS / DS_BUILD_SHM_COMM only matter at pip-install time). `build_shm_op` skips the
op when that dict says "not compatible", and DeepSpeed caches the dict at module level precisely so
edits to it persist, so we mark the op incompatible before the backend is created: gloo does the
(tiny, single-node) CPU all-reduces instead. The Adam optimizer is torch's (`torch_adam`), so
FusedAdam / CPUAdam are not JIT-built either; only `offload_optimizer=True` builds CPUAdam.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

SCHEDULES = ("constant", "cosine")
_SHM_OP_NAME = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "gloo" on CPU, "nccl" on GPU


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(*, timeout_minutes: float = 30.0, cpu_shm_comm: bool = False) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent); gloo on CPU, nccl on GPU.

    cpu_shm_comm: allow DeepSpeed's shared-memory CPU all-reduce (JIT-compiles for ~1-2 min on first use;
    only worth it for multi-process CPU runs with large gradients).
    """
    launched = "WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = _device_for(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"

    import deepspeed
    import deepspeed.comm as ds_comm

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if device.type == "cpu" and not cpu_shm_comm:
        deepspeed.ops.__compatible_ops__[_SHM_OP_NAME] = False  # see the module docstring
    if not launched and not dist.is_initialized():
        # A world of one: the store binds port 0 itself, so the OS picks a free port atomically (choosing a
        # "free" port first and binding it later races with other processes' ephemeral ports).
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timedelta(minutes=timeout_minutes))
        os.environ["MASTER_PORT"] = str(store.port)
        dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                timeout=timedelta(minutes=timeout_minutes))
    if not ds_comm.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=timedelta(minutes=timeout_minutes),
        )
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        backend=dist.get_backend(),
    )


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or no process group at all): the process that logs and writes shared files."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# Collectives. Every one in gdpo goes through these helpers: a process group initialised with NCCL has no CPU
# backend ("No backend type associated with device type cpu"), so each helper moves its tensor to the group's
# device (`comm_device`) for the call and copies the result back into the caller's tensor.

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def comm_device() -> torch.device:
    """The device collectives run on: the current CUDA device under NCCL, the CPU under gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Comm:
    """The raw torch.distributed calls the helpers below make (one seam, so tests can watch every collective)."""

    all_reduce = staticmethod(lambda x, op: dist.all_reduce(x, op=op))
    all_gather = staticmethod(lambda parts, x: dist.all_gather(parts, x))
    all_gather_object = staticmethod(lambda out, obj, group: dist.all_gather_object(out, obj, group=group))


_comm = _Comm()


def _copy_back(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Result of a collective (on the comm device) into the caller's tensor (on its own device)."""
    dst.copy_(src)


def _fetch(src: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A new tensor made by a collective (on the comm device), moved to the caller's device."""
    return src.to(device)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce (``sum`` / ``max`` / ``min``) over ranks into ``tensor``, whatever device it is on; returns it.
    Identity in a world of one."""
    if op not in _OPS:
        raise ValueError(f"unknown reduction {op!r}; expected one of {sorted(_OPS)}")
    if world_size() == 1:
        return tensor
    x = tensor.to(comm_device())
    _comm.all_reduce(x, _OPS[op])
    if x is not tensor:
        _copy_back(tensor, x)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor. Identity in a world of one."""
    return all_reduce(tensor, "sum")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    return bool(all_reduce(torch.tensor([float(flag)]), "max").item())


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of every rank along dim 0, in rank order (on tensor's device)."""
    if world_size() == 1:
        return tensor
    x = tensor.contiguous().to(comm_device())
    parts = [torch.empty_like(x) for _ in range(world_size())]
    _comm.all_gather(parts, x)
    return _fetch(torch.cat(parts), tensor.device)


def all_gather_object(obj, group=None) -> list:
    """Every rank's ``obj`` (picklable), in rank order within ``group`` (None = the world)."""
    n = dist.get_world_size(group=group) if dist.is_initialized() else 1
    if n == 1:
        return [obj]
    out = [None] * n
    _comm.all_gather_object(out, obj, group)
    return out


def group_rank(group=None) -> int:
    return dist.get_rank(group=group) if dist.is_initialized() else 0


def new_subgroups(groups: list[list[int]]):
    """A process group for each list of ranks; returns the one this rank belongs to."""
    mine, _ = dist.new_subgroups_by_enumeration(ranks_per_subgroup_list=groups)
    return mine


def lr_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float = 0.0
) -> float:
    """lr / peak lr for optimizer step `step` (0-based).

    Linear warmup reaches the peak at step warmup_steps - 1: mult = (step + 1) / warmup_steps.
    Then `constant` (1.0) or `cosine` from 1.0 at step warmup_steps to min_lr_ratio at total_steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    zero_stage: int = 0,
    grad_clip: float = 1.0,
    bf16: bool = False,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    micro_batch_size: int = 1,
    grad_accum_steps: int = 1,
) -> dict:
    """The DeepSpeed config dict `build_engine` uses (exposed for inspection and tests)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs zero_stage >= 1")
    if offload_params and zero_stage != 3:
        raise ValueError("offload_params needs zero_stage 3")
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        # Lets the checkpoint code gather full HF weights on rank 0 (`_zero3_consolidated_16bit_state_dict`).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(betas),
                "eps": eps,
                "weight_decay": weight_decay,
                # torch.optim.AdamW: no JIT build. Offloading on a GPU machine uses DeepSpeed's CPUAdam (fast,
                # compiled once); without CUDA the same maths runs in torch's AdamW rather than a 2-minute build.
                "torch_adam": not (offload_optimizer and torch.cuda.is_available()),
            },
        },
        "zero_force_ds_cpu_optimizer": bool(offload_optimizer and torch.cuda.is_available()),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: torch.nn.Module,
    *,
    lr: float,
    total_steps: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_lr_ratio: float = 0.0,
    zero_stage: int = 0,
    grad_clip: float = 1.0,
    bf16: bool | None = None,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    micro_batch_size: int = 1,
    grad_accum_steps: int = 1,
):
    """A DeepSpeed engine around `model`: AdamW, warmup + constant/cosine LR (LambdaLR), clipping, ZeRO.

    bf16 None = on iff CUDA is available. `total_steps` counts optimizer steps (for cosine).
    grad_accum_steps: micro-batches per optimizer step; `engine.backward` divides each micro-batch
    loss by it, and `optimizer_step(engine)` must be called after every backward.
    """
    init_distributed()
    import deepspeed

    if bf16 is None:
        bf16 = torch.cuda.is_available()
    config = deepspeed_config(
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        zero_stage=zero_stage,
        grad_clip=grad_clip,
        bf16=bf16,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
    )
    lr_lambda = functools.partial(
        lr_multiplier,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
    )
    lr_multiplier(0, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule)  # validate early
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=config,
        # Called with the torch optimizer; its state (last_epoch, base_lrs) goes into engine checkpoints.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
    )
    return engine


def engine_forward(engine, fn, *args, **kwargs):
    """`fn(engine.module, *args, **kwargs)`, run as the module's forward through `DeepSpeedEngine.forward`.

    Training forwards must go through the engine: DeepSpeed (0.19) does per-micro-batch bookkeeping there, and
    ZeRO-3 without it lets the gradients of micro-batches 2.. overwrite the earlier ones instead of accumulating
    (parameters off by ~2 lr per step; ZeRO-0/2 happen to be unaffected). Our forward is not the HF model's
    (token_logprobs runs the decoder, then the LM head in chunks), so the module's forward is swapped for `fn`
    for the one call. A plain module (no engine) is called directly.
    """
    if not hasattr(engine, "module"):
        return fn(engine, *args, **kwargs)
    module = engine.module
    module.forward = functools.partial(fn, module)  # an instance attribute shadows the class's forward
    try:
        return engine(*args, **kwargs)
    finally:
        del module.forward


class StepStats(NamedTuple):
    grad_norm: float | None  # global L2 norm of the gradients before clipping
    lr: float  # the learning rate this step used


def optimizer_step(engine) -> StepStats | None:
    """`engine.step()` after a backward; returns stats when an optimizer step was taken, else None.

    The engine only reports a grad norm from its ZeRO / bf16 optimizers; for plain fp32 stage 0 we
    compute it here (before the engine clips), from gradients it has already all-reduced.
    """
    boundary = engine.is_gradient_accumulation_boundary()
    lr = float(engine.get_lr()[0])
    manual_norm = None
    if (
        boundary
        and engine.zero_optimization_stage() == 0
        and not engine.bfloat16_enabled()
        and not engine.fp16_enabled()
    ):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        manual_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    engine.step()
    if not boundary:
        return None
    norm = manual_norm if manual_norm is not None else engine.get_global_grad_norm()
    if isinstance(norm, torch.Tensor):
        norm = float(norm)
    return StepStats(grad_norm=norm, lr=lr)


def engine_from_config(model: torch.nn.Module, optim, ds, *, total_updates: int, micro_batch_size: int,
                       grad_accum_steps: int):
    """`build_engine` from the ``optim`` and ``deepspeed`` config sections (gdpo.config dataclasses)."""
    return build_engine(
        model,
        lr=optim.lr,
        total_steps=total_updates,
        betas=tuple(optim.betas),
        weight_decay=optim.weight_decay,
        warmup_steps=int(round(optim.warmup_ratio * total_updates)),
        schedule=optim.schedule,
        min_lr_ratio=optim.min_lr_ratio,
        zero_stage=ds.zero_stage,
        grad_clip=optim.grad_clip,
        bf16={"auto": None, "true": True, "false": False}[ds.bf16],
        offload_optimizer=ds.offload_optimizer,
        offload_params=ds.offload_param,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
    )
