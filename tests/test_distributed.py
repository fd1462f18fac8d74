"""gdpo.distributed: world of one without a launcher, fast engine start, AdamW, LR, clipping."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gdpo.distributed import (
    all_reduce_sum,
    barrier,
    build_engine,
    deepspeed_config,
    init_distributed,
    is_main,
    lr_multiplier,
    optimizer_step,
)
from gdpo.testing import tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_lr_multiplier_by_hand():
    warm = [lr_multiplier(s, warmup_steps=4, total_steps=10, schedule="constant") for s in range(6)]
    assert warm == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]

    def cos(s):
        return lr_multiplier(s, warmup_steps=2, total_steps=10, schedule="cosine", min_lr_ratio=0.1)

    assert cos(0) == 0.5 and cos(1) == 1.0 and cos(2) == 1.0
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 8 cosine steps
    assert cos(4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 2**-0.5))  # a quarter of the way: cos(pi/4)
    assert cos(10) == pytest.approx(0.1) and cos(50) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        lr_multiplier(0, warmup_steps=0, total_steps=1, schedule="linear")


def test_world_of_one_helpers():
    info = init_distributed()
    assert info.world_size == 1 and info.rank == 0 and is_main()
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):  # MASTER_PORT: only where it made the store
        assert var in os.environ
    t = torch.tensor([1.5, 2.0])
    assert all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
    barrier()
    assert init_distributed() == info  # idempotent


def _loss(model, x):
    return model(input_ids=x, labels=x).loss


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_engine_matches_torch_adamw_with_clipping_and_warmup(zero_stage):
    """Two engine steps == two hand-driven torch AdamW steps (clip to 0.5, warmup lr 0.5x then 1x)."""
    lr, clip = 1e-2, 0.5
    engine = build_engine(
        tiny_model(seed=3),
        lr=lr,
        total_steps=4,
        warmup_steps=2,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        grad_clip=clip,
        zero_stage=zero_stage,
    )
    ref = tiny_model(seed=3)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        x = torch.randint(0, 259, (2, 8), generator=g)
        engine.backward(_loss(engine, x))
        stats = optimizer_step(engine)

        _loss(ref, x).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        for group in opt.param_groups:
            group["lr"] = lr * (step + 1) / 2  # warmup: 0.5 lr, then lr
        opt.step()
        opt.zero_grad()

        assert stats.lr == pytest.approx(lr * (step + 1) / 2)
        assert stats.grad_norm == pytest.approx(norm.item(), rel=1e-4)
        assert stats.grad_norm > clip  # so clipping was really exercised
    for (name, p), q in zip(engine.module.named_parameters(), ref.parameters()):
        if "k_proj.bias" in name:
            # Softmax is shift-invariant in the keys: this gradient is pure rounding noise (~1e-9),
            # which Adam rescales to +-lr, so it differs between any two summation orders.
            continue
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-4, msg=name)


def test_grad_accumulation_steps_only_at_boundary():
    engine = build_engine(tiny_model(seed=4), lr=1e-2, total_steps=2, grad_accum_steps=2, micro_batch_size=1)
    before = [p.detach().clone() for p in engine.module.parameters()]
    x = torch.randint(0, 259, (1, 8))
    engine.backward(_loss(engine, x))
    assert optimizer_step(engine) is None  # first micro-batch: no step
    assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    engine.backward(_loss(engine, x))
    assert optimizer_step(engine) is not None
    assert not all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))


def test_config_validation():
    cfg = deepspeed_config(lr=1e-3, zero_stage=3, grad_clip=1.0)
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ValueError, match="offload_optimizer"):
        deepspeed_config(lr=1e-3, zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(lr=1e-3, zero_stage=4)


_TWO_RANK_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from gdpo.checkpoint import load_checkpoint, save_checkpoint
    from gdpo.distributed import all_reduce_sum, build_engine, init_distributed, optimizer_step
    from gdpo.testing import tiny_model

    t0 = time.perf_counter()
    info = init_distributed()
    assert info.world_size == 2 and info.backend == "gloo", info
    assert all_reduce_sum(torch.tensor([info.rank + 1.0])).item() == 3.0

    def make():
        return build_engine(tiny_model(seed=0), lr=1e-2, total_steps=8, zero_stage=int(sys.argv[2]))

    make()
    print("startup_seconds", time.perf_counter() - t0)

    def train(engine, steps):
        for _ in range(steps):
            x = torch.randint(0, 259, (2, 8))  # differs per rank: each rank seeds its own stream
            engine.backward(engine(input_ids=x, labels=x).loss)
            optimizer_step(engine)

    torch.manual_seed(100 + info.rank)
    engine = make()
    train(engine, 2)
    save_checkpoint(sys.argv[1], 2, engine=engine, data_state={"position": 4})
    train(engine, 2)
    expected = [p.detach().clone() for p in engine.module.parameters()]
    resumed = make()
    state = load_checkpoint(sys.argv[1] + "/checkpoints/step_00000002", engine=resumed)
    assert state.data_state == {"position": 4}
    train(resumed, 2)
    for a, b in zip(expected, resumed.module.parameters()):
        assert torch.equal(a, b)
    print("rank", info.rank, "ok")
    """)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_fast_start_all_reduce_and_checkpoint(tmp_path):
    """Two processes with launcher env: fast start, gloo all-reduce, exact ZeRO-2 partitioned save/resume.

    Fast start: without the fix in init_distributed, DeepSpeed's TorchBackend JIT-compiles the
    deepspeed_shm_comm op into TORCH_EXTENSIONS_DIR (60-110 s) on every rank. Here process-group init
    plus the first engine must take seconds, and nothing may be compiled.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = dict(
            os.environ,
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            DS_ACCELERATOR="cpu",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
            TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _TWO_RANK_SCRIPT, str(tmp_path), "2"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=150) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-3000:]
        assert f"rank {r} ok" in out
        startup = float(out.split("startup_seconds")[1].split()[0])
        assert startup < 20, startup  # measured 2-5 s per rank with both ranks sharing 2 cores
    assert not (tmp_path / "ext").exists()
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    assert sorted(f.name for f in (ckpt / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
