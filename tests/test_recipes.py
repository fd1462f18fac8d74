"""Every recipe in configs/: the dry run passes offline with a local tokenizer (and, where the recipe's data is
not on this machine, the matching local file), and its first prompt equals the golden string in tests/golden/;
the dry run's errors are one line and exit 2. Each GPU recipe also trains 1 real step on CPU (tiny Qwen2, hf
backend; the vLLM backend in the vllm tier).

Golden files hold the first training prompt as one JSON string, exactly as `train.py --dry-run` prints it after
`first prompt: `. The test tokenizer is gdpo.testing.word_tokenizer (Qwen2's chat template, about one token per
word: the recipes' max_prompt_tokens filter as with a real tokenizer). Regenerate after an intended change with
GDPO_UPDATE_GOLDEN=1 and read the diff.
"""

import json
import os
from pathlib import Path

import pytest

from gdpo.config import load_config
from gdpo.dryrun import dry_run

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
SHARED = Path(os.environ.get("GDPO_SHARED_DATA") or ROOT / ".." / "shared" / "data").resolve()
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
GPU_RECIPES = ["code_gdpo", "code_grpo", "gsm8k_gdpo", "math_gdpo", "math_grpo", "tool_gdpo", "tool_grpo"]
# The offline fallback documented in the tool recipes' header (ToolRL's SFT file).
TOOL_FALLBACK = [f"data.path={SHARED}/toolcall/toolrl_rlla_sft.jsonl", "data.prompt_field=input",
                 'data.system_prompt="{instruction}"', "data.columns.ground_truth=output"]
# Data not on this machine -> the matching local file: DeepScaleR -> its MATH part; ToolRL's rlla_4k train split
# (a clone) -> its test split, the same verl format (the recipe itself never trains on it).
LOCAL_DATA = {
    "math_gdpo": [f"data.path={SHARED}/math_train.jsonl"],
    "math_grpo": [f"data.path={SHARED}/math_train.jsonl"],
    "tool_gdpo": [f"data.path={SHARED}/toolcall/toolrl_rlla_4k_test.jsonl"],
    "tool_grpo": [f"data.path={SHARED}/toolcall/toolrl_rlla_4k_test.jsonl"],
}
# A LoRA variant (<recipe>_lora.yaml) renders exactly its recipe's prompts: it shares the recipe's golden file.
CASES = [(c, c.removesuffix("_lora"), LOCAL_DATA.get(c.removesuffix("_lora"), [])) for c in CONFIGS] + [
    ("tool_gdpo", "tool_gdpo_fallback", TOOL_FALLBACK)]
needs_data = pytest.mark.skipif(not (SHARED / "code" / "mbpp.jsonl").exists(), reason="needs the shared data dir")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from gdpo.testing import word_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    word_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def in_repo_layout(tmp_path, monkeypatch):
    """cwd where the recipes' relative `../shared/data/...` paths reach the shared data (as from the repo root)."""
    (tmp_path / "shared").symlink_to(SHARED.parent, target_is_directory=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    return tmp_path / "repo"


def _dry(config: str, overrides: list[str]) -> tuple[int, list[str]]:
    lines: list[str] = []
    rc = dry_run(load_config(ROOT / "configs" / f"{config}.yaml", overrides), out=lines.append)
    return rc, lines


@needs_data
@pytest.mark.parametrize("config, golden, extra", CASES, ids=[g for _, g, _ in CASES])
def test_dry_run_first_prompt_is_golden(config, golden, extra, tokenizer_dir, in_repo_layout, capsys):
    rc, lines = _dry(config, [f"model.tokenizer={tokenizer_dir}", *extra])
    assert rc == 0, capsys.readouterr().err
    first = [ln for ln in lines if ln.startswith("first prompt: ")]
    assert len(first) == 1 and lines[-1] == first[0]
    text = json.loads(first[0][len("first prompt: "):])
    path = GOLDEN / f"{golden}.txt"
    if os.environ.get("GDPO_UPDATE_GOLDEN"):
        path.write_text(first[0][len("first prompt: "):] + "\n")
    assert text == json.loads(path.read_text()), f"first prompt of {golden} changed; see {path}"
    # what every recipe's prompt must look like
    assert text.startswith("<|im_start|>") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", extra)
    if cfg.data.system_prompt and "{" not in cfg.data.system_prompt:
        assert text.startswith("<|im_start|>system\n" + cfg.data.system_prompt + "<|im_end|>\n")
    if cfg.data.prompt_template and "boxed" in cfg.data.prompt_template:
        assert "\\boxed{}." in text and "{{" not in text
    assert any(ln.startswith("batch plan: world_size=1, ") for ln in lines)
    assert any(ln.startswith("tokens per step at the max lengths: ") for ln in lines)


def test_gpu_recipes_use_colocated_vllm_with_sleep():
    for name in GPU_RECIPES:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.rollout.backend == "vllm" and cfg.rollout.vllm_sleep, name
        assert 0.4 <= cfg.rollout.vllm_gpu_memory_utilization <= 0.7, name
        head = (ROOT / "configs" / f"{name}.yaml").read_text().splitlines()[:3]
        assert any(h.startswith(f"# deepspeed --num_gpus 8 train.py --config configs/{name}.yaml") for h in head)


def test_grpo_recipes_differ_from_gdpo_only_in_the_estimator():
    from gdpo.config import to_dict

    for a, b in (("math_gdpo", "math_grpo"), ("tool_gdpo", "tool_grpo"), ("code_gdpo", "code_grpo")):
        da, db = (to_dict(load_config(ROOT / "configs" / f"{n}.yaml")) for n in (a, b))
        assert da["advantage"].pop("estimator") == "gdpo" and db["advantage"].pop("estimator") == "grpo"
        da["train"].pop("run_dir"), db["train"].pop("run_dir")
        assert da == db, (a, b)


def test_tool_recipes_do_not_train_on_the_eval_split():
    for name in ("tool_gdpo", "tool_grpo"):
        assert "test" not in load_config(ROOT / "configs" / f"{name}.yaml").data.path


def test_code_recipes_train_on_mbpp_train_split_with_the_eval_prompt():
    from gdpo.eval.benchmarks import MBPP_PROMPT_TEMPLATE

    for name in ("code_gdpo", "code_grpo"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        assert cfg.data.where == {"split": "train", "reference_passes": True}
        assert cfg.data.prompt_template == MBPP_PROMPT_TEMPLATE
        assert [r.fn for r in cfg.rewards.functions] == ["code_pass", "length", "code_bug"]
        assert cfg.rewards.functions[1].condition.on == "pass" and cfg.rewards.functions[1].condition.threshold == 1


# ------------------------------------------------------------------------------------------------ errors


def _one_line_error(capsys, rc: int, *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("config error: "), err
    for n in needles:
        assert n in err, err


@needs_data
def test_dry_run_errors_are_one_line_exit_2(tokenizer_dir, in_repo_layout, tmp_path, capsys):
    tok = f"model.tokenizer={tokenizer_dir}"
    rc, _ = _dry("gsm8k_gdpo", [tok, "rewards.functions.0.fn=nope"])
    _one_line_error(capsys, rc, "rewards.functions.0.fn", "unknown fn 'nope'")
    rc, _ = _dry("gsm8k_gdpo", [tok, "data.path=../shared/data/no_such.jsonl"])
    _one_line_error(capsys, rc, "data.path", "does not exist")
    (tmp_path / "not_a_tokenizer").mkdir()
    rc, _ = _dry("gsm8k_gdpo", [f"model.tokenizer={tmp_path / 'not_a_tokenizer'}"])
    _one_line_error(capsys, rc, "model.tokenizer: cannot load the tokenizer")
    rc, _ = _dry("gsm8k_gdpo", [tok, f"checkpoint.resume={tmp_path}"])
    _one_line_error(capsys, rc, "checkpoint.resume", "is not a complete checkpoint")
    rc, _ = _dry("gsm8k_gdpo", [tok, "data.prompt_template='{question} in words'"])
    _one_line_error(capsys, rc, "data.prompt_template: placeholder {question} names a field that no row has",
                    "answer, id, problem, solution, source")
    rc, _ = _dry("gsm8k_gdpo", [tok, "model.name_or_path=./no/such/model"])
    _one_line_error(capsys, rc, "model.name_or_path: './no/such/model' does not exist")
    rc, _ = _dry("gsm8k_gdpo", [tok, "rollout.prompts_per_step=33"])
    assert rc == 0  # one process: any count splits; 8 processes would not
    os.environ["WORLD_SIZE"] = "8"
    try:
        rc, _ = _dry("gsm8k_gdpo", [tok, "rollout.prompts_per_step=33"])
    finally:
        del os.environ["WORLD_SIZE"]
    _one_line_error(capsys, rc, "rollout.prompts_per_step: 33 prompts do not split evenly over 8 processes")


def test_train_py_dry_run_flag(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny_gdpo.yaml", "--dry-run",
                        "train.seed=3"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("first prompt: ")]
    assert json.loads(line[0][len("first prompt: "):]).startswith("<|im_start|>user\n")
    p = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny_gdpo.yaml", "--dry-run",
                        "rewards.functions.1.fn=nope"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "unknown fn 'nope'" in p.stderr


def test_dry_run_checks_prompts_against_the_models_context(capsys):
    """The demo model's context is 512 tokens: max_new_tokens 512 leaves no room; 500 leaves 12, fewer than any
    demo prompt has, so every row is a bad row (never a truncated prompt)."""
    rc, _ = _dry("tiny_gdpo", ["rollout.max_new_tokens=512"])
    _one_line_error(capsys, rc, "rollout.max_new_tokens: 512 leaves no room for a prompt in the model's context of 512")
    rc, _ = _dry("tiny_gdpo", ["rollout.max_new_tokens=500"])
    _one_line_error(capsys, rc, "no valid prompts", "prompt_exceeds_context", "+ rollout.max_new_tokens 500 > the "
                    "model's context 512")
    rc, lines = _dry("tiny_gdpo", ["rollout.max_new_tokens=485"])  # 27 tokens left: the shorter prompts fit
    assert rc == 0 and any("prompt_exceeds_context" in ln for ln in lines if ln.startswith("data: "))
    assert any("context: 512 tokens (the demo model)" in ln for ln in lines)


def test_dry_run_says_whether_packing_takes_effect():
    rc, lines = _dry("tiny_gdpo", ["loss.packing=true"])
    assert rc == 0 and ("loss.packing: off: model.attn_implementation default (sdpa) has no variable-length kernel; "
                        "training runs padded (one of flash_attention_2, flash_attention_3 packs)") in lines
    rc, lines = _dry("tiny_gdpo", ["loss.packing=true", "model.attn_implementation=flash_attention_2"])
    assert rc == 0 and "loss.packing: on if the start's probe passes (flash_attention_2)" in lines
    rc, lines = _dry("tiny_gdpo", [])
    assert rc == 0 and not any(ln.startswith("loss.packing") for ln in lines)
