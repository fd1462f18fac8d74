"""The embedded demo: task generator, shipped data, tokenizer, tiny Qwen2 model, cached warm start."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gdpo.demo import DEMO, build_model, build_tokenizer, make_problems, tiny_qwen2_config, warm_start
from gdpo.demo import task
from gdpo.demo.warmstart import MARKER, encode_example

FORMAT = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.S)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# Reference arithmetic, written independently of the generator.
OPS = {
    "add": lambda a, b, c: a + b,
    "sub": lambda a, b, c: a - b,
    "mul": lambda a, b, c: a * b,
    "add_sub": lambda a, b, c: a + b - c,
    "mul_add": lambda a, b, c: a * b + c,
    "mul_sub": lambda a, b, c: a * b - c,
}


def _recompute(problem: str) -> int:
    """Match the problem against every template and redo the arithmetic from its numbers."""
    for text, op in task.EASY_TEMPLATES + task.HARD_TEMPLATES:
        pattern = re.escape(text)
        for name in "nmi":
            pattern = pattern.replace(re.escape("{" + name + "}"), r"[A-Za-z]+")
        for name in "abc":
            pattern = pattern.replace(re.escape("{" + name + "}"), rf"(?P<{name}>\d+)", 1)
            pattern = pattern.replace(re.escape("{" + name + "}"), rf"(?P={name})")
        m = re.fullmatch(pattern, problem)
        if m:
            nums = {k: int(v) for k, v in m.groupdict().items()}
            return OPS[op](nums["a"], nums["b"], nums.get("c", 0))
    raise AssertionError(f"no template matches {problem!r}")


def _is_formatted(text: str) -> bool:
    return bool(FORMAT.match(text)) and all(text.count(t) == 1 for t in TAGS)


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_problems_are_deterministic_and_correct(difficulty: str) -> None:
    rows = make_problems(300, seed=7, difficulty=difficulty)
    assert rows == make_problems(300, seed=7, difficulty=difficulty)
    assert rows != make_problems(300, seed=8, difficulty=difficulty)
    assert len({r["id"] for r in rows}) == 300
    for r in rows:
        assert set(r) == {"id", "problem", "answer"}
        assert r["answer"] == str(_recompute(r["problem"]))
        assert int(r["answer"]) >= 0


def test_unknown_difficulty_is_rejected() -> None:
    with pytest.raises(ValueError, match="difficulty"):
        make_problems(1, seed=0, difficulty="medium")


def test_shipped_files_are_current_and_small(tmp_path: Path) -> None:
    # Regenerating must give the committed bytes: the data is stable and the script reproduces it.
    written = task.write_shipped_files(tmp_path)
    for path in written:
        assert path.read_bytes() == (task.DATA_DIR / path.name).read_bytes(), path.name
    assert sum((task.DATA_DIR / p.name).stat().st_size for p in written) < 1_000_000
    assert len(task.read_jsonl(DEMO.train_file)) == task.N_TRAIN
    hard = task.read_jsonl(DEMO.train_hard_file)
    assert all(r["id"].startswith("hard-") and r["answer"] == str(_recompute(r["problem"])) for r in hard)


def test_sft_mix_has_the_intended_flaws() -> None:
    rows = task.read_jsonl(DEMO.sft_file)
    tok = build_tokenizer()
    counts = {"wrong": 0, "format": 0, "long": 0}
    for r in rows:
        text, flaws = str(r["completion"]), list(r["flaws"])
        m = re.search(r"<answer>(.*?)</answer>", text)
        n_tokens = len(tok(text)["input_ids"])
        for f in flaws:
            counts[f] += 1
        assert r["answer"] == str(_recompute(str(r["problem"])))
        assert _is_formatted(text) == ("format" not in flaws), text
        if m:  # the "unterminated" format flaw has no parsable answer at all
            assert (m.group(1) == r["answer"]) == ("wrong" not in flaws), text
        if "format" not in flaws:
            assert (n_tokens <= DEMO.length_limit) == ("long" not in flaws), (n_tokens, text)
    # Independent Bernoulli flaws: observed rates within ~4 standard errors of the configured ones.
    for flaw, p in (("wrong", task.P_WRONG), ("format", task.P_BAD_FORMAT), ("long", task.P_LONG)):
        assert abs(counts[flaw] / len(rows) - p) < 4 * math.sqrt(p * (1 - p) / len(rows)), flaw


def test_tokenizer_round_trips_task_text_and_keeps_tags() -> None:
    tok = build_tokenizer()
    assert len(tok) == 512
    texts = [str(r["problem"]) for r in task.read_jsonl(DEMO.train_hard_file)[:200]]
    texts += [str(r["completion"]) for r in task.read_jsonl(DEMO.sft_file)[:300]]
    texts += ["Unseen words, tabs\tand ünïcödé 42!", task.SYSTEM_PROMPT]
    for text in texts:
        assert tok.decode(tok(text)["input_ids"]) == text
    # Task words are whole tokens, digits are split, tags are single non-special tokens.
    assert tok.convert_ids_to_tokens(tok(" apples 123")["input_ids"]) == ["Ġapples", "Ġ", "1", "2", "3"]
    ids = tok("<think>3 + 5 = 8</think>\n<answer>8</answer><|im_end|>")["input_ids"]
    assert [tok.convert_ids_to_tokens(i) for i in ids[:1] + ids[-4:]] == [
        "<think>", "<answer>", "8", "</answer>", "<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>3 + 5 = 8</think>\n<answer>8</answer>"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id


def test_chat_template_is_qwen_style() -> None:
    tok = build_tokenizer()
    msgs = task.chat_messages("Tom has 3 apples.")
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nTom has 3 apples.<|im_end|>\n<|im_start|>assistant\n"
    with_system = tok.apply_chat_template(task.chat_messages("Hi", system_prompt="Be brief."), tokenize=False)
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    completion = "<think>3</think>\n<answer>3</answer>"
    prompt_ids, completion_ids = encode_example(tok, "Tom has 3 apples.", completion)
    assert tok.decode(prompt_ids) == text
    assert tok.decode(completion_ids) == completion + "<|im_end|>"


def test_tokenizer_and_model_survive_save_and_autoload(tmp_path: Path) -> None:
    # The reload goes through AutoTokenizer next to a qwen2 config.json, which rebuilds the tokenizer as
    # a Qwen2Tokenizer from vocab + merges: ids must not change on the way.
    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    for r in task.read_jsonl(DEMO.sft_file)[:100]:
        prompt = tok.apply_chat_template(task.chat_messages(str(r["problem"])), add_generation_prompt=True,
                                         tokenize=False)
        assert tok2.apply_chat_template(task.chat_messages(str(r["problem"])), add_generation_prompt=True,
                                        tokenize=False) == prompt
        full = prompt + str(r["completion"])
        assert tok2(full)["input_ids"] == tok(full)["input_ids"]
    assert (tok2.eos_token_id, tok2.pad_token_id, len(tok2)) == (tok.eos_token_id, tok.pad_token_id, len(tok))
    x = torch.tensor([tok("Tom has 3 apples")["input_ids"]])
    torch.testing.assert_close(model2(x).logits, model(x).logits)


def test_tiny_model_is_qwen2_with_head_dim_32() -> None:
    tok = build_tokenizer()
    model = build_model(tok, seed=0)
    assert model.config.model_type == "qwen2"
    attn = model.model.layers[0].self_attn
    assert attn.head_dim >= 32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.config.max_position_embeddings == 512
    x = torch.tensor([tok("Tom has 3 apples")["input_ids"]])
    assert model(x).logits.shape == (1, x.shape[1], len(tok))
    same = build_model(tok, seed=0)
    other = build_model(tok, seed=1)
    torch.testing.assert_close(same.lm_head.weight, model.lm_head.weight)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match="head_dim"):
        tiny_qwen2_config(100, hidden_size=64, num_attention_heads=4)


def test_warm_start_trains_saves_and_reuses(tmp_path: Path) -> None:
    sft = tmp_path / "sft_small.jsonl"
    task.write_jsonl(sft, task.read_jsonl(DEMO.sft_file)[:64])
    logs: list[str] = []
    kwargs = dict(steps=24, seed=0, batch_size=8, lr=3e-3, warmup_steps=2, sft_file=sft, log=logs.append)

    out = warm_start(tmp_path / "run", **kwargs)
    assert out == tmp_path / "run" / "sft"
    summary = json.loads((out / MARKER).read_text())
    assert summary["settings"]["steps"] == 24
    # Loss starts near ln(512) = 6.2 at init; two dozen steps on 64 examples must bring it well down.
    assert summary["first_loss"] > 5.5
    assert summary["last_loss"] < 4.0, summary
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    # Same settings: reused, not retrained.
    assert warm_start(tmp_path / "run", **kwargs) == out
    assert weights.stat().st_mtime_ns == stamp
    assert any("reusing" in line for line in logs)

    # The saved directory is an ordinary HF checkpoint that can generate.
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    enc = tok([tok.apply_chat_template(task.chat_messages("Tom has 3 apples."), add_generation_prompt=True,
                                       tokenize=False)], return_tensors="pt")
    gen = model.generate(**enc, do_sample=False, max_new_tokens=5)
    assert gen.shape[1] > enc["input_ids"].shape[1]

    # Different settings, other SFT data, or a directory without the marker: rebuilt.
    assert warm_start(tmp_path / "run", **{**kwargs, "steps": 2}) == out
    assert json.loads((out / MARKER).read_text())["settings"]["steps"] == 2
    stamp = weights.stat().st_mtime_ns
    task.write_jsonl(sft, task.read_jsonl(DEMO.sft_file)[64:128])
    warm_start(tmp_path / "run", **{**kwargs, "steps": 2})
    assert weights.stat().st_mtime_ns != stamp
    assert sum("reusing" in line for line in logs) == 1  # only the identical call above reused
    (out / MARKER).unlink()
    cache = warm_start(tmp_path / "ignored", **{**kwargs, "steps": 2, "cache_dir": out})
    assert cache == out and (out / MARKER).is_file()
