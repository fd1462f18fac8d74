import json
from pathlib import Path

import pytest

from gdpo.rewards import format as format_reward
from gdpo.rewards import toolcall_correct
from gdpo.rewards.toolcall import parse_tool_calls, toolcall_score

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "toolcall"
DATA = DATA / "toolrl_rlla_4k_test.jsonl"


def call(name, **params):
    return {"name": name, "parameters": params}


def as_text(calls, think="t"):
    body = "\n".join(json.dumps(c) for c in calls)
    return f"<think>{think}</think>\n<tool_call>\n{body}\n</tool_call>"


# Hand-computed: score = name Jaccard + sum over gt calls of (key Jaccard + #equal values);
# S_max = 1 + sum(1 + #params); reward = 6 * score / S_max - 3.
@pytest.mark.parametrize(
    "gt, pred, expected",
    [
        ([call("f", a=1)], [call("f", a=1)], 3.0),  # exact match
        ([call("f", a=1, b=2)], [call("f", a=1, b=5)], 1.5),  # (1 + 1 + 1) / 4
        ([call("f", a=1), call("g", x="y")], [call("f", a=1)], 0.0),  # (0.5 + 2) / 5
        ([call("f", a=1)], [call("f", a=1, c=2)], 2.0),  # (1 + 0.5 + 1) / 3
        ([call("f", a=1)], [call("h", a=1)], -3.0),  # wrong tool: nothing matches
        ([call("f", a=1), call("g")], [call("g"), call("f", a=1)], 3.0),  # order only: (1 + 2 + 1) / 4
        # greedy: the first gt call takes the only prediction: (0.5 + 1) / 5
        ([call("f", a=1), call("f", a=2)], [call("f", a=2)], -1.2),
        ([call("f", a="1")], [call("f", a=1)], 1.0),  # "1" != 1: (1 + 1 + 0) / 3
        ([call("f", a=1)], [], -3.0),  # empty block: name Jaccard 0
    ],
)
def test_toolcall_score_hand_computed(gt, pred, expected):
    assert toolcall_score(gt, pred) == pytest.approx(expected)
    assert toolcall_correct([""], [as_text(pred)], ground_truth=[as_text(gt)]) == [pytest.approx(expected)]


def test_missing_or_malformed_block_is_minus_three():
    gt = as_text([call("f", a=1)])
    completions = [
        "<think>no call</think>",
        "<think>t</think>\n<tool_call>\n{not json}\n</tool_call>",
        '<think>t</think>\n<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n',  # never closed
        '<think>t</think>\n<tool_call>\n["f"]\n</tool_call>',  # JSON but not a call
        '<think>t</think>\n<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n\n</tool_call>x' + "\x00" * 10,
    ]
    out = toolcall_correct([""] * 5, completions, ground_truth=[gt] * 5)
    assert out[:4] == [-3.0] * 4
    assert out[4] == 3.0  # trailing junk after the block does not matter to correctness


def test_ground_truth_without_tool_call_scores_zero_and_missing_one_does_not_apply():
    out = toolcall_correct(["", ""], ["<think>x</think>\n<response>r</response>"] * 2,
                           ground_truth=["<think>t</think>\n<response>hi</response>", None])
    assert out == [0.0, None]


def test_parse_tool_calls_reads_the_first_block():
    text = as_text([call("f", a=1)]) + "\n" + as_text([call("g")])
    assert parse_tool_calls(text) == [call("f", a=1)]


def test_hostile_inputs_give_numbers():
    gt = as_text([call("f", a=1)])
    nested = "<tool_call>\n" + "{" * 100_000 + "\n</tool_call>"
    junk = ["", "<tool_call>" * 50_000, "\ud800\x00", nested, "😀"]
    out = toolcall_correct([""] * 5, junk, ground_truth=[gt] * 5)
    assert out == [-3.0] * 5


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data/toolcall/toolrl_rlla_4k_test.jsonl")
def test_toolrl_test_rows_ground_truth_scored_against_itself():
    rows = [json.loads(line) for line in open(DATA)]
    gts = [r["reward_model"]["ground_truth"] for r in rows]
    n = len(gts)
    fmt = format_reward([""] * n, gts, template="toolrl", ground_truth=gts)
    correct = toolcall_correct([""] * n, gts, ground_truth=gts)
    assert fmt == [1.0] * n
    with_call = [i for i, gt in enumerate(gts) if "<tool_call>" in gt]
    assert len(with_call) >= 70  # 71 of the 80 rows call a tool; the others only respond
    assert all(correct[i] == 3.0 for i in with_call)
    assert all(correct[i] == 0.0 for i in range(n) if i not in with_call)  # the rule: no gt call -> 0
    # And renaming the first tool of each call block costs reward.
    renamed = [gts[i].replace('{"name": "', '{"name": "X', 1) for i in with_call]
    worse = toolcall_correct([""] * len(renamed), renamed, ground_truth=[gts[i] for i in with_call])
    assert all(v < 3.0 for v in worse)
