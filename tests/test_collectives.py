"""Every collective goes through gdpo.distributed and receives its tensor on the process group's device.

An NCCL group has no CPU backend, so a CPU tensor sent to it fails ("No backend type associated with device type
cpu") — the defect that ended every multi-GPU run at step 1. This CPU machine has no second real device, so the
tests pretend the group's device is ``meta``: a collective that received a CPU tensor would fail the check.
"""

import ast
import sys
from pathlib import Path

import pytest
import torch

import gdpo.distributed as gd

ROOT = Path(__file__).resolve().parents[1]


def test_torch_distributed_is_used_only_in_gdpo_distributed():
    offenders = []
    for f in sorted((ROOT / "gdpo").rglob("*.py")):
        if f.name == "distributed.py" and f.parent.name == "gdpo":
            continue
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                names = [f"{node.value.id}.{node.attr}"]
            if any(n.startswith("torch.distributed") for n in names):
                offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


class Recorder:
    """Stands in for the raw torch.distributed calls; records the device of every tensor it receives."""

    def __init__(self):
        self.calls = []

    def all_reduce(self, x, op):
        self.calls.append(("all_reduce", x.device.type))

    def all_gather(self, parts, x):
        self.calls.append(("all_gather", x.device.type))

    def all_gather_object(self, out, obj, group):
        self.calls.append(("all_gather_object", None))
        out[:] = [obj] * len(out)


@pytest.fixture
def fake_nccl(monkeypatch):
    """A world of 2 whose group lives on the 'meta' device; collectives are recorded, not run (the values
    stay those of this rank, which is all a world of one can check)."""
    rec = Recorder()
    monkeypatch.setattr(gd, "_comm", rec)
    monkeypatch.setattr(gd, "world_size", lambda: 2)
    monkeypatch.setattr(gd, "comm_device", lambda: torch.device("meta"))
    monkeypatch.setattr(gd, "_copy_back", lambda dst, src: None)
    monkeypatch.setattr(gd, "_fetch", lambda src, device: torch.zeros(src.shape, dtype=src.dtype, device=device))
    return rec


def test_helpers_move_tensors_to_the_group_device(fake_nccl):
    t = torch.tensor([1.0, 2.0])
    assert gd.all_reduce(t, "max") is t and t.tolist() == [1.0, 2.0]
    assert gd.all_reduce_sum(t) is t
    assert gd.any_rank(True) is True
    assert gd.all_gather_rows(torch.ones(3, 2)).shape == (6, 2)
    assert fake_nccl.calls == [("all_reduce", "meta")] * 3 + [("all_gather", "meta")]
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        gd.all_reduce(t, "avg")


def test_a_training_step_sends_every_collective_to_the_group_device(fake_nccl, tmp_path):
    """One real step of the loop (dynamic sampling, GDPO's batch moments, token counts, metric reduction, the
    advantage histogram) with the group on 'meta': every collective the loop makes must arrive there."""
    sys.path.insert(0, str(ROOT / "tests"))
    from gdpo.config import load_config
    from gdpo.testing import tiny_model, tiny_tokenizer
    from gdpo.trainer import train

    tok = tiny_tokenizer()
    tiny_model(tokenizer=tok, seed=0).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    train(load_config(ROOT / "configs" / "tiny_gdpo.yaml", [
        f"model.name_or_path={tmp_path / 'm'}", f"data.path={ROOT / 'gdpo/demo/train.jsonl'}", "data.max_samples=8",
        "rollout.group_size=2", "rollout.prompts_per_step=2", "rollout.max_new_tokens=4", "train.steps=1",
        "rollout.dynamic_sampling=true", "rewards.num_workers=1", "logging.progress_bar=false",
        "logging.wandb.mode=offline", "checkpoint.save_final=false", f"train.run_dir={tmp_path / 'run'}",
        "rewards.functions=[{name: h, fn: 'user_rewards:text_hash'}]",
    ]))
    kinds = {name for name, _ in fake_nccl.calls}
    assert {"all_reduce", "all_gather"} <= kinds, fake_nccl.calls
    assert len(fake_nccl.calls) >= 6  # dynamic-sampling vote, GDPO moments, token count, 3 metric vectors
    assert all(dev == "meta" for _, dev in fake_nccl.calls if dev is not None), fake_nccl.calls
