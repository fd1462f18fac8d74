"""LoRA (PEFT) end to end on CPU: adapter-only training, the adapter-off reference, PEFT-format checkpoints, exact
resume, merged export, and eval with an adapter."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gdpo.trainer
from gdpo.config import ConfigError, config_from_dict, load_config
from gdpo.policy.lora import AdapterOffReference, apply_lora, base_name, merged_sync_weights
from gdpo.policy.model import token_logprobs
from gdpo.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
LORA = ["model.lora.r=4", "model.lora.alpha=8", "loss.beta=0.1", "optim.lr=0.02"]
TINY = [
    "rollout.group_size=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=12", "rewards.num_workers=1",
    "logging.progress_bar=false", "logging.wandb.mode=disabled", f"data.path={ROOT / 'gdpo/demo/train.jsonl'}",
    "data.max_samples=64",
    "rewards.functions=[{name: vowels, fn: 'user_rewards:vowel_fraction'}, {name: h, fn: 'user_rewards:text_hash'}]",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    tok = tiny_tokenizer()
    tiny_model(tokenizer=tok, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _cfg(tiny_dir, run_dir, *extra):
    return load_config(ROOT / "configs/tiny_gdpo.yaml",
                       [f"model.name_or_path={tiny_dir}", f"train.run_dir={run_dir}", *TINY, *LORA, *extra])


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------------------------- units


def test_config_lora_is_typed_and_refuses_ignored_settings():
    assert config_from_dict({}).model.lora.r == 0
    assert config_from_dict({"model": {"lora": {"r": 8, "alpha": 16}}}).model.lora.alpha == 16.0
    with pytest.raises(ConfigError, match=r"model.lora.alpha: set, but model.lora.r is 0"):
        config_from_dict({"model": {"lora": {"alpha": 32}}})
    with pytest.raises(ConfigError, match="model.lora.rank"):
        config_from_dict({"model": {"lora": {"rank": 8}}})
    with pytest.raises(ConfigError, match="model.lora.bias"):
        config_from_dict({"model": {"lora": {"r": 8, "bias": "some"}}})
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        config_from_dict({"model": {"lora": {"r": 8, "target_modules": []}}})
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        config_from_dict({"model": {"lora": {"r": 8, "dropout": 1.0}}})
    # trained biases move the base model: the adapter-off reference would not be the initial policy
    with pytest.raises(ConfigError, match="model.lora.bias: 'all' trains base-model biases"):
        config_from_dict({"model": {"lora": {"r": 8, "bias": "all"}}, "loss": {"beta": 0.1}})
    assert config_from_dict({"model": {"lora": {"r": 8, "bias": "all"}, "ref_name_or_path": "x"},
                             "loss": {"beta": 0.1}}).model.lora.bias == "all"
    assert config_from_dict({"model": {"lora": {"r": 8, "bias": "lora_only"}}}).loss.beta == 0


def _peft(seed=3):
    model = apply_lora(tiny_model(tokenizer=tiny_tokenizer(), seed=0), r=4, alpha=8.0, dropout=0.0,
                       target_modules=["q_proj", "v_proj", "down_proj"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def test_merged_sync_weights_are_the_base_names_and_peft_merge():
    model = _peft()
    got = {n: (p.value() if hasattr(p, "value") else p.data) for n, p in merged_sync_weights(model)}
    base = tiny_model(tokenizer=tiny_tokenizer(), seed=0)
    assert sorted(got) == sorted(n for n, _ in base.named_parameters())  # every base weight, by its own name
    import copy

    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    for n, v in got.items():
        torch.testing.assert_close(v, merged[n].data, atol=1e-6, rtol=0)
    # by hand for one layer: W + alpha / r * B @ A
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    by_hand = q.base_layer.weight + 2.0 * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj.weight"], by_hand, atol=1e-6, rtol=0)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], q.base_layer.weight)
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], base.model.layers[0].self_attn.k_proj.weight)
    assert base_name("base_model.model.lm_head.weight") == "lm_head.weight"


def test_adapter_off_reference_is_the_base_model():
    model = _peft()
    base = tiny_model(tokenizer=tiny_tokenizer(), seed=0)
    ids = torch.randint(0, 200, (3, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        with AdapterOffReference(model).model() as ref:
            off = token_logprobs(ref, ids, mask, 4).logprobs
        on = token_logprobs(model, ids, mask, 4).logprobs
        plain = token_logprobs(base, ids, mask, 4).logprobs
    torch.testing.assert_close(off, plain, atol=1e-6, rtol=0)
    assert (on - plain).abs().max() > 1e-2  # the adapters are back on after the block
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def run4(tiny_dir, tmp_path_factory):
    """4 LoRA steps (KL on, 2 epochs of 2 minibatches), checkpoints at 2 and 4; the live context is kept."""
    sys.path.insert(0, str(TESTS))  # user_rewards
    run = tmp_path_factory.mktemp("lora_run") / "straight"
    seen = {}
    real_setup = gdpo.trainer.setup

    def spy(cfg):
        ctx = real_setup(cfg)
        seen["ctx"] = ctx
        seen["init"] = {n: p.detach().clone() for n, p in ctx.policy.named_parameters()}
        return ctx

    gdpo.trainer.setup = spy
    try:
        last = gdpo.trainer.train(_cfg(tiny_dir, run, "train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=3",
                                       "loss.epochs=2", "loss.minibatch_size=4"))
    finally:
        gdpo.trainer.setup = real_setup
    return {"run": run, "last": last, **seen}


@pytest.mark.slow
def test_only_adapters_train_and_the_reference_is_the_policy(run4):
    ctx, init = run4["ctx"], run4["init"]
    assert isinstance(ctx.ref_model, AdapterOffReference) and ctx.ref_model.policy is ctx.policy  # no 2nd copy
    trained = {n for n, p in ctx.engine.module.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    opt_params = [p for g in ctx.engine.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in opt_params} == {id(p) for n, p in ctx.policy.named_parameters() if n in trained}
    now = dict(ctx.policy.named_parameters())
    for n, p in now.items():
        if n in trained:
            continue
        assert torch.equal(p, init[n]), f"base weight {n} changed"
    moved = [n for n in trained if not torch.equal(now[n], init[n])]
    assert any("lora_B" in n for n in moved) and any("lora_A" in n for n in moved)
    assert run4["last"]["loss/kl"] > 0  # the KL to the adapter-off reference is live


@pytest.mark.slow
def test_checkpoint_is_a_peft_adapter(run4, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = run4["run"] / "checkpoints" / "step_00000004"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "ds"} <= names
    assert "model.safetensors" not in names
    ds_bytes = sum(f.stat().st_size for f in (ckpt / "ds").rglob("*") if f.is_file())
    base_bytes = (Path(tiny_dir) / "model.safetensors").stat().st_size
    assert ds_bytes < base_bytes  # the frozen base weights are not in the DeepSpeed state
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), str(ckpt)).eval()
    live = run4["ctx"].policy
    for n, p in loaded.named_parameters():
        torch.testing.assert_close(p, dict(live.named_parameters())[n], atol=0, rtol=0)


@pytest.mark.slow
def test_lora_resume_equals_uninterrupted(run4, tiny_dir, tmp_path):
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run4["run"] / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    shutil.copy(run4["run"] / "fingerprint.json", resumed / "fingerprint.json")  # the run's identity: auto resumes
    code = ("import sys; from gdpo.config import load_config; from gdpo.trainer import train; "
            f"train(load_config({str(ROOT / 'configs/tiny_gdpo.yaml')!r}, sys.argv[1:]))")
    args = [f"model.name_or_path={tiny_dir}", f"train.run_dir={resumed}", *TINY, *LORA, "train.steps=4",
            "checkpoint.every=2", "checkpoint.keep_last=3", "loss.epochs=2", "loss.minibatch_size=4",
            "checkpoint.resume=auto"]
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=ENV)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resumed from" in p.stdout
    name = "adapter_model.safetensors"
    a = _safetensors(run4["run"] / "checkpoints" / "step_00000004" / name)
    b = _safetensors(resumed / "checkpoints" / "step_00000004" / name)
    two = _safetensors(run4["run"] / "checkpoints" / "step_00000002" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged"
    assert not all(torch.equal(a[k], two[k]) for k in a)  # steps 3-4 changed the adapter


@pytest.mark.slow
def test_merged_export_and_eval_with_adapter(run4, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = run4["run"] / "checkpoints" / "step_00000004"
    out = tmp_path / "merged"
    p = subprocess.run([sys.executable, "-m", "gdpo.export", "--merge", "--adapter", str(ckpt), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # a plain HF model again
    ids = torch.randint(0, 200, (2, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = token_logprobs(run4["ctx"].policy.eval(), ids, mask, 3).logprobs
        got = token_logprobs(merged, ids, mask, 3).logprobs
        base = token_logprobs(AutoModelForCausalLM.from_pretrained(str(tiny_dir)), ids, mask, 3).logprobs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-3
    # refused: an output dir that is not empty, a directory without an adapter
    again = subprocess.run([sys.executable, "-m", "gdpo.export", "--merge", "--adapter", str(ckpt), "--out",
                            str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)
    assert again.returncode == 2 and "not empty" in again.stderr

    # eval: --model base --adapter ckpt samples exactly what the merged model samples (greedy)
    from gdpo.eval.__main__ import main

    data = tmp_path / "adds.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(3)))
    common = ["--benchmarks", f"adds={data}", "--k", "1", "--temperature", "0", "--max-tokens", "8",
              "--grader-workers", "0", "--no-progress"]
    assert main(["--model", str(tiny_dir), "--adapter", str(ckpt), "--output-dir", str(tmp_path / "ea"), *common]) == 0
    assert main(["--model", str(out), "--output-dir", str(tmp_path / "em"), *common]) == 0
    assert main(["--model", str(tiny_dir), "--output-dir", str(tmp_path / "eb"), *common]) == 0

    def texts(d):
        return [json.loads(line)["completion"] for line in (tmp_path / d / "samples.jsonl").read_text().splitlines()]

    assert texts("ea") == texts("em") and texts("ea") != texts("eb")
    run_cfg = json.loads((tmp_path / "ea" / "run_config.json").read_text())["fingerprint"]
    assert run_cfg["adapter"] == str(ckpt.resolve())
    assert main(["--model", str(tiny_dir), "--adapter", str(tiny_dir), "--output-dir", str(tmp_path / "x"),
                 *common]) == 2


def test_bad_target_module_fails_at_start(tiny_dir, tmp_path):
    sys.path.insert(0, str(TESTS))
    with pytest.raises(ConfigError, match="model.lora.target_modules"):
        gdpo.trainer.train(_cfg(tiny_dir, tmp_path, "train.steps=1", "model.lora.target_modules=[no_such_proj]"))


@pytest.mark.parametrize("name", ["math_gdpo", "math_grpo", "gsm8k_gdpo", "tool_gdpo", "tool_grpo"])
def test_each_gpu_recipe_has_a_lora_config(name):
    """configs/<recipe>_lora.yaml: the recipe's own settings, plus adapters, 10x lr and ZeRO-0."""
    full, lora = (load_config(ROOT / f"configs/{n}.yaml") for n in (name, f"{name}_lora"))
    assert lora.model.lora.r == 32 and lora.model.lora.alpha == 64 and full.model.lora.r == 0
    assert lora.optim.lr == pytest.approx(10 * full.optim.lr) and lora.deepspeed.zero_stage == 0
    assert (lora.rewards, lora.rollout, lora.advantage, lora.loss, lora.data) == (
        full.rewards, full.rollout, full.advantage, full.loss, full.data)
    assert lora.train.run_dir.endswith(f"{name}_lora")
    text = (ROOT / f"configs/{name}_lora.yaml").read_text()
    assert text.startswith(f"# deepspeed --num_gpus 8 train.py --config configs/{name}_lora.yaml\n")


def test_lora_with_gradient_checkpointing_and_dropout_trains_the_adapters(tiny_dir, tmp_path, monkeypatch):
    """The GPU recipes run with gradient checkpointing: the adapters still get gradients through it."""
    sys.path.insert(0, str(TESTS))
    seen = {}
    real_setup = gdpo.trainer.setup

    def spy(cfg):
        ctx = real_setup(cfg)
        seen["ctx"], seen["init"] = ctx, {n: p.detach().clone() for n, p in ctx.policy.named_parameters()}
        return ctx

    monkeypatch.setattr(gdpo.trainer, "setup", spy)
    gdpo.trainer.train(_cfg(tiny_dir, tmp_path, "train.steps=1", "model.gradient_checkpointing=true",
                            "model.lora.dropout=0.1", "checkpoint.save_final=false"))
    now = dict(seen["ctx"].policy.named_parameters())
    moved = {n for n, p in now.items() if not torch.equal(p, seen["init"][n])}
    # step 1: B = 0, so only B gets a gradient (dL/dA = B^T (...) = 0)
    assert moved and all("lora_B" in n for n in moved)


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_the_other_kind(run4, tiny_dir, tmp_path):
    """A LoRA checkpoint resumed without model.lora (or the reverse) is refused at start, in one line."""
    ckpt = run4["run"] / "checkpoints" / "step_00000002"
    cfg = load_config(ROOT / "configs/tiny_gdpo.yaml", [f"model.name_or_path={tiny_dir}", f"train.run_dir={tmp_path}",
                                                         *TINY, f"checkpoint.resume={ckpt}"])
    with pytest.raises(ConfigError, match="holds a LoRA adapter, but model.lora.r is 0"):
        gdpo.trainer.train(cfg)
