"""LoRA under DeepSpeed ZeRO-3 on 2 CPU ranks (torchrun --standalone): train.py with adapters and the adapter-off
KL reference, against the same run at ZeRO-0 (same seeds, same rollouts: the adapters must agree), and a ZeRO-3
resume from the step-1 checkpoint (1 + 1 steps equal 2 steps)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from test_zero3 import REPO, _env, _run_concurrently

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_lora_zero3_two_ranks_matches_zero0(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from gdpo.testing import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "tiny_model"
    tok = tiny_tokenizer()
    tiny_model(tokenizer=tok, seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    common = [
        "train.py", "--config", "configs/tiny_gdpo.yaml", f"model.name_or_path={model_dir}",
        f"data.path={REPO / 'gdpo/demo/train.jsonl'}", "data.max_samples=16", "train.steps=2",
        "rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8", "loss.micro_batch_size=2",
        "optim.lr=0.01", "loss.beta=0.1", "model.lora.r=4", "model.lora.alpha=8", "rewards.num_workers=1",
        "logging.progress_bar=false", "logging.wandb.mode=disabled",
        "rewards.functions=[{name: even, fn: 'zero3_rewards:even_chars'},"
        " {name: vowels, fn: 'user_rewards:vowel_fraction'}]",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    outs = _run_concurrently([
        [*torchrun, *common, "deepspeed.zero_stage=3", f"train.run_dir={tmp_path / 'zero3'}", "checkpoint.every=1",
         "checkpoint.keep_last=2"],
        [*torchrun, *common, "deepspeed.zero_stage=0", f"train.run_dir={tmp_path / 'zero0'}"],
    ], _env(tmp_path))
    assert all("2 process(es) on cpu" in o for o in outs)
    rows = {s: [json.loads(x) for x in (tmp_path / s / "metrics.jsonl").read_text().splitlines()]
            for s in ("zero3", "zero0")}
    assert rows["zero3"][0]["rewards/even/mean"] == rows["zero0"][0]["rewards/even/mean"]  # same rollouts
    assert rows["zero3"][-1]["loss/kl"] > 0  # step 2: the policy moved away from the adapter-off reference
    ad = {}
    for s in ("zero3", "zero0"):
        final = tmp_path / s / "checkpoints" / "step_00000002"
        assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
        if s == "zero3":
            assert len(list((final / "ds").glob("*optim_states.pt"))) == 2  # one optimizer partition per rank
        ad[s] = load_file(str(final / "adapter_model.safetensors"))  # ZeRO-3: gathered onto rank 0
    assert ad["zero3"].keys() == ad["zero0"].keys() and len(ad["zero3"]) == 2 * 7 * 2  # A, B x 7 targets x 2 layers
    moved = max(ad["zero3"][k].abs().max().item() for k in ad["zero3"] if "lora_B" in k)
    assert moved > 1e-3  # B starts at 0
    diff = max((ad["zero3"][k] - ad["zero0"][k]).abs().max().item() for k in ad["zero3"])
    assert diff < 1e-5, diff
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                                     str(tmp_path / "zero3" / "checkpoints" / "step_00000002"))
    b = peft.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert torch.equal(b, ad["zero3"][key])

    # resume at ZeRO-3: a fresh launch from the step-1 checkpoint alone ends at the same step-2 adapter, bit for bit
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "zero3" / "checkpoints" / "step_00000001", resumed / "checkpoints" / "step_00000001")
    shutil.copy(tmp_path / "zero3" / "fingerprint.json", resumed / "fingerprint.json")  # auto resumes this run only
    (out,) = _run_concurrently([[*torchrun, *common, "deepspeed.zero_stage=3", f"train.run_dir={resumed}",
                                 "checkpoint.resume=auto"]], _env(tmp_path))
    assert "resumed from" in out
    again = load_file(str(resumed / "checkpoints" / "step_00000002" / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], ad["zero3"][k]) for k in ad["zero3"]), "ZeRO-3 LoRA resume diverged"
