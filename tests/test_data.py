"""Prompt data: field mapping, templates, malformed rows, file formats, real datasets, seeded iteration."""

import json
import os
from pathlib import Path

import pytest

from gdpo.data import (
    PromptIterator,
    build_prompt_dataset,
    collate,
    get_field,
    load_prompt_dataset,
    read_rows,
)
from gdpo.testing import tiny_tokenizer

TOK = tiny_tokenizer()
SHARED = Path(os.environ.get("GDPO_SHARED_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")


def _ids(text, special=False):
    return TOK(text, add_special_tokens=special)["input_ids"]


def test_get_field_dotted_paths():
    row = {"a": {"b": [10, {"c": "x"}]}, "d": None}
    assert get_field(row, "a.b.0") == 10
    assert get_field(row, "a.b.1.c") == "x"
    assert get_field(row, "d") is None
    assert get_field(row, "a.z", "missing") == "missing"
    assert get_field(row, "a.b.5", "missing") == "missing"


def test_chat_template_with_system_prompt_and_template():
    rows = [{"q": "2+2?", "meta": {"gt": "4"}, "n": 4}]
    ds = build_prompt_dataset(
        rows,
        TOK,
        prompt_field="q",
        answer_field="n",
        extra_fields={"gt": "meta.gt"},
        system_prompt="Be brief.",
        prompt_template="Q: {prompt} {{json: 1}}",
    )
    ex = ds[0]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ: 2+2? {json: 1}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ex.prompt_text == expected
    assert ex.prompt_ids == _ids(expected)
    assert ex.answer == "4" and ex.extras == {"gt": "4"}  # numbers become strings


def test_message_list_prompt_used_as_is():
    msgs = [{"role": "system", "content": "tools..."}, {"role": "user", "content": "call it"}]
    ds = build_prompt_dataset([{"prompt": msgs}], TOK, system_prompt="ignored: there is a system turn")
    assert ds[0].prompt_text == (
        "<|im_start|>system\ntools...<|im_end|>\n<|im_start|>user\ncall it<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_raw_prompt_template_without_chat():
    ds = build_prompt_dataset(
        [{"prompt": "hello"}], TOK, use_chat_template=False, prompt_template="Question: {prompt}\nAnswer:"
    )
    assert ds[0].prompt_text == "Question: hello\nAnswer:"
    assert ds[0].prompt_ids == _ids("Question: hello\nAnswer:", special=True)


MALFORMED = [
    {"prompt": "ok", "answer": "1", "gt": {"x": 1}},  # valid
    {"answer": "1", "gt": {"x": 1}},  # missing_prompt
    {"prompt": 5, "answer": "1", "gt": {"x": 1}},  # bad_prompt_type
    {"prompt": [{"role": "user"}], "answer": "1", "gt": {"x": 1}},  # bad_prompt_type (message w/o content)
    {"prompt": "   ", "answer": "1", "gt": {"x": 1}},  # empty_prompt
    {"prompt": "ok", "gt": {"x": 1}},  # missing_answer
    {"prompt": "ok", "answer": ["1"], "gt": {"x": 1}},  # bad_answer_type
    {"prompt": "ok", "answer": "1"},  # missing_gt
    {"prompt": "x" * 500, "answer": "1", "gt": {"x": 1}},  # prompt_too_long
    "not a dict",  # bad_row_type
    {"prompt": "fine too", "answer": 2.5, "gt": {"x": 2}},  # valid
]


def test_malformed_rows_skipped_and_counted():
    ds = build_prompt_dataset(
        MALFORMED, TOK, answer_field="answer", extra_fields={"gt": "gt.x"}, max_prompt_tokens=100
    )
    assert [e.row for e in ds.examples] == [0, 10]
    assert [e.answer for e in ds.examples] == ["1", "2.5"]
    assert ds.num_rows == 11
    assert ds.skipped == {
        "missing_prompt": 1,
        "bad_prompt_type": 2,
        "empty_prompt": 1,
        "missing_answer": 1,
        "bad_answer_type": 1,
        "missing_gt": 1,
        "prompt_too_long": 1,
        "bad_row_type": 1,
    }


def test_malformed_rows_fail_at_start_when_asked():
    with pytest.raises(ValueError, match="missing_prompt"):
        build_prompt_dataset(MALFORMED, TOK, answer_field="answer", on_error="error")
    with pytest.raises(ValueError, match="no valid prompts"):
        build_prompt_dataset([{"prompt": ""}], TOK)
    with pytest.raises(ValueError, match="chat template"):
        build_prompt_dataset([{"prompt": "a"}], type("T", (), {"chat_template": None})())


def test_file_formats_agree(tmp_path):
    rows = [{"problem": f"question {i}", "answer": i} for i in range(4)]
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows[:2])
        + "\n{not json\n\n"
        + "\n".join(json.dumps(r) for r in rows[2:])
    )
    (tmp_path / "d.json").write_text(json.dumps({"train": rows}))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))

    kw = dict(prompt_field="problem", answer_field="answer")
    jl = load_prompt_dataset(tmp_path / "d.jsonl", TOK, **kw)
    assert jl.skipped == {"bad_json": 1} and jl.num_rows == 5
    for src in ("d.json", "d.parquet", "saved"):
        other = load_prompt_dataset(tmp_path / src, TOK, **kw)
        assert [e.prompt_ids for e in other.examples] == [e.prompt_ids for e in jl.examples]
        assert [e.answer for e in other.examples] == ["0", "1", "2", "3"]
    assert len(load_prompt_dataset(tmp_path / "d.parquet", TOK, limit=3, **kw)) == 3
    (tmp_path / "d.csv").write_text("problem,answer\n")
    with pytest.raises(ValueError, match="unsupported"):
        read_rows(tmp_path / "d.csv")


def test_gsm8k_fields():
    path = SHARED / "gsm8k_test.jsonl"
    if not path.exists():
        pytest.skip("shared data not present")
    ds = load_prompt_dataset(
        path, TOK, prompt_field="problem", answer_field="answer", extra_fields={"id": "id"}, limit=50
    )
    assert len(ds) == 50 and ds.skipped == {}
    assert ds[0].answer == "18" and ds[0].extras == {"id": "gsm8k-test-0"}
    assert "Janet’s ducks lay 16 eggs per day." in ds[0].prompt_text
    assert TOK.decode(ds[0].prompt_ids) == ds[0].prompt_text  # byte-level tokenizer round-trips UTF-8


def test_toolrl_nested_ground_truth_and_message_prompts():
    path = SHARED / "toolcall" / "toolrl_rlla_4k_test.jsonl"
    if not path.exists():
        pytest.skip("shared data not present")
    ds = load_prompt_dataset(
        path, TOK, prompt_field="prompt", extra_fields={"ground_truth": "reward_model.ground_truth"}, limit=10
    )
    row = json.loads(path.open().readline())
    assert ds[0].extras["ground_truth"] == row["reward_model"]["ground_truth"]
    assert ds[0].prompt_text.startswith("<|im_start|>" + row["prompt"][0]["role"] + "\n")
    assert ds[0].prompt_text.endswith(row["prompt"][-1]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    batch = collate(ds, [3, 1])
    assert batch.indices == [3, 1] and batch.extras["ground_truth"][1] == ds[1].extras["ground_truth"]


def test_iterator_epochs_seed_and_resume():
    it = PromptIterator(10, 4, seed=7)
    batches = [it.next_indices() for _ in range(5)]  # 20 indices = 2 epochs exactly
    flat = [i for b in batches for i in b]
    assert all(len(b) == 4 for b in batches)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] == it.order(0) and flat[10:] == it.order(1) and it.order(0) != it.order(1)
    assert it.order(0) == PromptIterator(10, 4, seed=7).order(0)
    assert it.order(0) != PromptIterator(10, 4, seed=8).order(0)

    # Resume mid-epoch from the state dict: the same continuation.
    a = PromptIterator(10, 3, seed=1)
    a.next_indices(), a.next_indices()
    state = json.loads(json.dumps(a.state_dict()))  # it goes through trainer_state.json
    b = PromptIterator(10, 3, seed=999)
    b.load_state_dict(state)
    assert [b.next_indices() for _ in range(4)] == [a.next_indices() for _ in range(4)]
    with pytest.raises(ValueError, match="examples"):
        PromptIterator(11, 3).load_state_dict(state)


def test_iterator_no_shuffle_and_num_epochs():
    it = PromptIterator(5, 2, shuffle=False, num_epochs=1)
    assert list(it) == [[0, 1], [2, 3], [4]]


def test_unreachable_hub_id_fails_at_start():
    with pytest.raises(ValueError, match="could not load dataset"):
        read_rows("no-such-org/no-such-dataset")  # HF_HUB_OFFLINE=1 in tests


# ----------------------------------------------------------------------------- the renderer (issue 19)


def test_template_braces_and_chat_template_both_apply():
    """Before: a template turned the chat template off and `\\boxed{{}}` reached the model with doubled braces."""
    from gdpo.config import yaml_load

    yaml_text = 't: "{prompt} Let\'s think step by step and output the final answer within \\\\boxed{{}}."'
    template = yaml_load(yaml_text)["t"]
    assert template == "{prompt} Let's think step by step and output the final answer within \\boxed{{}}."
    ds = build_prompt_dataset([{"problem": "1+1?"}], TOK, prompt_field="problem", prompt_template=template,
                              use_chat_template=True)
    assert ds[0].prompt_text == (
        "<|im_start|>user\n1+1? Let's think step by step and output the final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    raw = build_prompt_dataset([{"problem": "1+1?"}], TOK, prompt_field="problem", prompt_template=template,
                               use_chat_template=False, system_prompt="S")
    assert raw[0].prompt_text == "S\n\n1+1? Let's think step by step and output the final answer within \\boxed{}."


def test_template_reads_any_column_and_system_prompt_template():
    rows = [{"input": "call it", "instruction": "tools: {a}", "meta": {"level": 3}}]
    ds = build_prompt_dataset(rows, TOK, prompt_field="input", system_prompt="{instruction}",
                              prompt_template="[L{meta.level:02d}] {input} / {prompt!r}")
    assert ds[0].prompt_text == (
        "<|im_start|>system\ntools: {a}<|im_end|>\n<|im_start|>user\n[L03] call it / 'call it'<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_naming_a_missing_column_fails_at_start_naming_it():
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}]
    with pytest.raises(ValueError, match=r"\{problme\}.*fields are: answer, problem"):
        build_prompt_dataset(rows, TOK, prompt_field="problem", prompt_template="{problme}")
    with pytest.raises(ValueError, match="data.system_prompt"):
        build_prompt_dataset(rows, TOK, prompt_field="problem", system_prompt="{nope}")
    with pytest.raises(ValueError, match="write literal braces as"):
        build_prompt_dataset(rows, TOK, prompt_field="problem", prompt_template="{prompt} \\boxed{}")
    # a column that only some rows lack: those rows are bad rows
    ds = build_prompt_dataset(rows + [{"problem": "c", "answer": "3", "hint": "h"}, {"problem": "d"}], TOK,
                              prompt_field="problem", prompt_template="{prompt} ({hint})")
    assert [e.prompt_text for e in ds.examples] == [
        "<|im_start|>user\nc (h)<|im_end|>\n<|im_start|>assistant\n"
    ]
    assert ds.skipped == {"missing_hint": 3}


def test_template_on_message_prompts_is_refused():
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="messages_with_prompt_template"):
        build_prompt_dataset([{"prompt": msgs}], TOK, prompt_template="Q: {prompt}")


# -------------------------------------------------------------------------------- bad input (issue 13)


def test_non_utf8_line_is_one_bad_row_with_its_line_number(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n\n{"prompt": "b"}\n')
    ds = load_prompt_dataset(p, TOK)
    assert [e.prompt_text.split("\n")[1] for e in ds.examples] == ["a<|im_end|>", "b<|im_end|>"]
    assert ds.skipped == {"not_utf8": 1} and ds.num_rows == 3
    assert ds.first_bad == ["line 2: not_utf8 (byte 0xe9 at column 16 is not UTF-8)"]
    assert "line 2: not_utf8" in ds.skipped_summary()
    with pytest.raises(ValueError, match="line 2: not_utf8"):
        load_prompt_dataset(p, TOK, on_error="error")


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n')
    ds = load_prompt_dataset(p, TOK)
    assert len(ds) == 2 and ds.skipped == {}
    q = tmp_path / "d.json"
    q.write_bytes(b'\xef\xbb\xbf[{"prompt": "a"}]')
    assert len(load_prompt_dataset(q, TOK)) == 1


def test_prompt_longer_than_the_context_is_skipped_or_refused_never_truncated():
    rows = [{"prompt": "x" * 10}, {"prompt": "y" * 40}]
    # the chat wrapper adds 19 tokens: prompts are 29 and 59 tokens; context 64 - 16 new tokens = 48
    ds = build_prompt_dataset(rows, TOK, max_prompt_tokens=1000, context_length=64, max_new_tokens=16)
    assert [len(e.prompt_ids) for e in ds.examples] == [29]
    assert ds.skipped == {"prompt_exceeds_context": 1}
    assert "59 tokens + rollout.max_new_tokens 16 > the model's context 64" in ds.first_bad[0]
    with pytest.raises(ValueError, match="prompt_exceeds_context"):
        build_prompt_dataset(rows, TOK, context_length=64, max_new_tokens=16, on_error="error")
    with pytest.raises(ValueError, match="leaves no room"):
        build_prompt_dataset(rows, TOK, context_length=64, max_new_tokens=64)


def test_on_bad_row_words_match_the_config():
    """Before: the config allowed skip|error and data.py wanted skip|raise, so `error` never worked."""
    import typing

    from gdpo.config import DataConfig, load_config
    from gdpo.data import ON_ERROR

    assert typing.get_args(typing.get_type_hints(DataConfig)["on_bad_row"]) == ON_ERROR == ("skip", "error")
    cfg = load_config(None, ["data.on_bad_row=error"])
    with pytest.raises(ValueError, match="1 bad rows .*missing_prompt"):
        build_prompt_dataset([{"prompt": "ok"}, {"q": "no prompt"}], TOK, on_error=cfg.data.on_bad_row)
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        build_prompt_dataset([{"prompt": "ok"}], TOK, on_error="raise")
