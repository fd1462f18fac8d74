import pytest

from gdpo.rewards import format as format_reward
from gdpo.rewards import length


def fmt(completions, **kw):
    return format_reward([""] * len(completions), completions, **kw)


def test_think_answer_template():
    ok = "<think>reason</think>\n<answer>42</answer>"
    completions = [
        ok,
        ok + "\n",  # `$` accepts one trailing newline, as the reference regex does
        "<think>multi\nline</think>\n<answer>a\nb</answer>",
        "<think>reason</think><answer>42</answer>",  # no newline between the blocks
        "<think>reason</think>\n\n<answer>42</answer>",
        "hi " + ok,  # text before
        ok + " bye",  # text after
        "<think>a</think>\n<think>b</think>\n<answer>42</answer>",  # a tag twice
        "<think>x</think>\n<answer>1</answer>\n<answer>2</answer>",
        "<answer>42</answer>",
        "",
    ]
    assert fmt(completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


CALL = '<tool_call>\n{"name": "f", "parameters": {}}\n</tool_call>'


@pytest.mark.parametrize(
    "ground_truth, completion, expected",
    [
        (f"<think>t</think>\n{CALL}", f"<think>mine</think>\n{CALL}", 1.0),
        (f"<think>t</think>\n{CALL}", "<think>mine</think>\n<response>hi</response>", 0.0),
        (f"<think>t</think>\n{CALL}", f"<think>mine</think>\n{CALL}\n{CALL}", 0.0),  # tool_call twice
        # no newlines inside the tool_call block
        (f"<think>t</think>\n{CALL}", '<think>m</think>\n<tool_call>{"name": "f"}</tool_call>', 0.0),
        ("<think>t</think>\n<response>ok</response>", "<think>m</think>\n<response>sure</response>", 1.0),
        ("<think>t</think>\n<response>ok</response>", f"<think>m</think>\n{CALL}", 0.0),
        (f"<think>t</think>\n{CALL}\n<response>r</response>",
         f"<think>m</think>\n{CALL}\n<response>x</response>", 1.0),
        (f"<think>t</think>\n{CALL}\n<response>r</response>", f"<think>m</think>\n{CALL}", 0.0),
        ("<think>only</think>", "<think>just thinking</think>", 1.0),
        ("<think>only</think>", "<think>a</think>\n<response>b</response>", 0.0),
        (f"<think>t</think>\n{CALL}", f"<think>a</think><think>b</think>\n{CALL}", 0.0),  # think twice
    ],
)
def test_toolrl_template_depends_on_ground_truth(ground_truth, completion, expected):
    assert fmt([completion], template="toolrl", ground_truth=[ground_truth]) == [expected]


def test_toolrl_without_ground_truth_does_not_apply():
    assert fmt(["<think>x</think>"], template="toolrl", ground_truth=[None]) == [None]


def test_custom_pattern_and_once_tags():
    out = fmt(["<a>1</a>", "<a>1</a><a>2</a>", "b"], pattern=r"^(<a>\d</a>)+$", once=("<a>",))
    assert out == [1.0, 0.0, 0.0]


def test_unknown_template_is_an_error():
    with pytest.raises(ValueError, match="allowed: think_answer, toolrl"):
        fmt(["x"], template="xml")


def test_hostile_inputs_give_numbers():
    long_ok = "<think>" + "x" * 200_000 + "</think>\n<answer>1</answer>"
    junk = ["", "<think>" * 100_000, "\x00\xff\ud800", long_ok, ""]
    assert fmt(junk) == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert fmt(junk, template="toolrl", ground_truth=[f"<think>t</think>\n{CALL}"] * 5) == [0.0] * 5


def test_length_binary_is_the_papers_reward():
    assert length([""] * 4, ["a"] * 4, completion_lengths=[0, 3999, 4000, 4001]) == [1.0, 1.0, 1.0, 0.0]


def test_length_graded_ramps_down_linearly():
    lengths = [100, 150, 175, 300]
    out = length([""] * 4, ["a"] * 4, completion_lengths=lengths, max_tokens=100, graded=True, margin=100)
    assert out == [1.0, 0.5, 0.25, 0.0]


def test_length_counts_words_without_token_counts():
    assert length(["", ""], ["one two three", "one two three four"], max_tokens=3) == [1.0, 0.0]
