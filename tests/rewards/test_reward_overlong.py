"""DAPO's soft overlong punishment as a built-in reward, through the bank like every other."""

import pytest

from gdpo.rewards import RewardBank, RewardSpec, overlong


def test_overlong_values_and_edges():
    # L_max = 100, buffer 20: 0 up to 80, then (80 - L) / 20, -1 beyond 100
    lens = [0, 80, 81, 90, 99, 100, 101, 500]
    got = overlong([""] * len(lens), [""] * len(lens), completion_lengths=lens, max_tokens=100, buffer=20)
    assert got == pytest.approx([0.0, 0.0, -0.05, -0.5, -0.95, -1.0, -1.0, -1.0])
    # buffer = max_tokens: the ramp starts at 0 tokens
    assert overlong(["", ""], ["", ""], completion_lengths=[0, 5], max_tokens=10, buffer=10) == [0.0, -0.5]
    # without token counts, words are counted
    assert overlong([""], ["a b c"], max_tokens=4, buffer=2) == [-0.5]
    for bad in (0, -1, 11):
        with pytest.raises(ValueError, match="buffer"):
            overlong([""], [""], completion_lengths=[1], max_tokens=10, buffer=bad)


def test_overlong_is_a_builtin():
    with RewardBank([RewardSpec("long", "overlong", kwargs={"max_tokens": 10, "buffer": 4})], num_workers=1) as b:
        res = b.score(["", "", ""], ["a", "b", "c"], completion_lengths=[3, 8, 12])
    assert res.matrix[:, 0].tolist() == pytest.approx([0.0, -0.5, -1.0])
