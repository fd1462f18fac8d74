"""collect_batch with a fake engine and reward bank: dynamic sampling keeps, drops, refills and terminates."""

import torch

from gdpo.sampling import collect_batch, constant_groups
from gdpo.testing import FakePrompts, FakeRolloutEngine, FakeScorer

G = 2


def _collect(fn, *, per_rank=2, dynamic=True, max_rounds=3, any_rank=bool):
    engine, bank = FakeRolloutEngine(), FakeScorer(["a", "b"], fn)
    sb = collect_batch(engine, bank, FakePrompts(per_rank).next, group_size=G, prompts_per_rank=per_rank,
                       pad_id=0, dynamic_sampling=dynamic, max_rounds=max_rounds, any_rank=any_rank)
    return sb, engine


def test_constant_groups_need_every_reward_constant():
    nan = float("nan")
    r = torch.tensor([
        [1, 0], [1, 0],      # both constant -> dropped
        [1, 0], [0, 1],      # sums constant (1, 1) but each reward varies -> kept: GDPO has signal here
        [1, nan], [1, 1],    # reward 1 applies once only, reward 0 constant -> dropped
        [0, 1], [0, 0],      # reward 1 varies -> kept
    ], dtype=torch.float32)
    assert constant_groups(r, 2).tolist() == [True, False, True, False]


def test_without_dynamic_sampling_one_round_as_generated():
    sb, engine = _collect(lambda p, c: [0.0, 0.0], dynamic=False)
    assert engine.calls == 1 and sb.rounds == 1 and sb.dropped_groups == 0
    assert sb.num_rows == 4 and sb.prompt_texts == ["q1", "q1", "q2", "q2"]
    assert sb.rewards.shape == (4, 2)
    assert sb.rollout_stats["rollout/seconds"] == 0.5


def test_group_kept_when_any_reward_varies_even_if_the_sum_is_constant():
    # reward a = sample index, b = 1 - a: the sum is 1 in every row, each reward varies -> nothing dropped
    sb, engine = _collect(lambda p, c: [float(c.split("s")[1][0]), 1.0 - float(c.split("s")[1][0])])
    assert engine.calls == 1 and sb.dropped_groups == 0 and sb.num_rows == 4


def test_signal_free_groups_are_dropped_and_refilled():
    # only prompts with an odd id have signal: round 1 (q1, q2) keeps q1, round 2 (q3, q4) adds q3
    def fn(p, c):
        return [float(c.split("s")[1][0]) if int(p[1:]) % 2 else 0.0, 0.0]

    sb, engine = _collect(fn)
    assert engine.calls == 2 and sb.rounds == 2 and sb.dropped_groups == 2
    assert sb.prompt_texts == ["q1", "q1", "q3", "q3"]
    assert sb.rewards[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert sb.rollout_stats["rollout/seconds"] == 1.0  # summed over the two rounds
    assert sb.rollout_stats["rollout/tokens_per_second"] == sb.rollout_stats["rollout/completion_tokens"] / 1.0


def test_out_of_rounds_fills_with_dropped_groups():
    sb, engine = _collect(lambda p, c: [0.0, 1.0], max_rounds=2)  # no group ever has signal
    assert engine.calls == 2 and sb.dropped_groups == 4 and sb.num_rows == 4
    assert sb.prompt_texts == ["q1", "q1", "q2", "q2"]  # the first dropped groups fill the batch


def test_full_rank_keeps_generating_while_another_is_short_and_never_crashes():
    """A rank that is full after round 1 and never dropped a group, while another rank stays short: it runs
    the same rounds (the vote says someone is short) and returns its batch (the old loop crashed here)."""
    votes = []

    def other_rank_short(short: bool) -> bool:
        votes.append(short)
        return True  # another rank is always short

    for max_rounds in (1, 3):
        votes.clear()
        sb, engine = _collect(lambda p, c: [float(c.split("s")[1][0]), 0.0], max_rounds=max_rounds,
                              any_rank=other_rank_short)
        assert engine.calls == max_rounds == sb.rounds and votes == [False] * max_rounds
        assert sb.dropped_groups == 0 and sb.prompt_texts == ["q1", "q1", "q2", "q2"]
