import logging
import math
import os
import time
from types import SimpleNamespace

import pytest
import torch

from gdpo.rewards import Condition, RewardBank, RewardResult, RewardSpec, resolve_reward_fn
from gdpo.rewards.lengths import length


# --- reward functions with known behaviour (the bank forks, so local functions need no pickling) ---------


def always_one(prompts, completions, **kw):
    return [1.0] * len(completions)


def echo_score(prompts, completions, *, score, **kw):
    return list(score)


def boom(prompts, completions, **kw):
    raise RuntimeError("boom in reward")


def hang_on_marker(prompts, completions, **kw):
    if any("HANG" in c for c in completions):
        time.sleep(3600)
    return [1.0] * len(completions)


def die(prompts, completions, **kw):
    os._exit(3)


def one_short(prompts, completions, **kw):
    return [1.0] * (len(completions) - 1)


def not_numbers(prompts, completions, **kw):
    return ["high"] * len(completions)


def infinite(prompts, completions, **kw):
    return [math.inf] * len(completions)


def worker_pid(prompts, completions, **kw):
    return [float(os.getpid())] * len(completions)


def kwargs_probe(prompts, completions, *, completion_lengths, scale=1.0, **columns):
    return [scale * n + len(columns["tag"][i]) for i, n in enumerate(completion_lengths)]


def batch(n, **columns):
    return dict(prompts=["p"] * n, completions=["c"] * n, completion_lengths=[1] * n, columns=columns)


# --- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "specs, message",
    [
        ([RewardSpec("r", "no_such_reward")], "reward 'r': unknown fn 'no_such_reward'; allowed: a built-in"),
        ([RewardSpec("r", "no_such_pkg.mod:fn")], "reward 'r': cannot import module 'no_such_pkg.mod'"),
        ([RewardSpec("r", "gdpo.rewards.lengths:nope")],
         "reward 'r': module 'gdpo.rewards.lengths' has no attribute 'nope'"),
        ([RewardSpec("r", ":fn")], "reward 'r': bad fn ':fn'"),
        ([RewardSpec("r", 3)], "reward 'r': fn must be a string or a callable"),
        ([RewardSpec("a", "length"), RewardSpec("a", "length")], "reward 'a': duplicate name"),
        ([RewardSpec("a", "length", condition=Condition("ghost"))],
         "reward 'a': condition on unknown reward 'ghost'"),
        ([RewardSpec("a", "length", condition=Condition("a"))], "reward 'a': condition on itself"),
        (
            [
                RewardSpec("a", "length", condition=Condition("c")),
                RewardSpec("b", "length", condition=Condition("a")),
                RewardSpec("c", "length", condition=Condition("b")),
            ],
            "conditions form a cycle: a -> c -> b -> a",
        ),
        ([RewardSpec("a", "length", kwargs={"completions": []})], "reward 'a': kwargs may not set"),
        ([RewardSpec("a", "length", kwargs=[1])], "reward 'a': kwargs must be a mapping"),
        ([], "at least one reward"),
    ],
)
def test_invalid_configs_fail_at_start(specs, message):
    with pytest.raises(ValueError) as e:
        RewardBank(specs, num_workers=1)
    assert message in str(e.value)


def test_resolve_builtin_module_path_and_callable():
    assert resolve_reward_fn("length") is length
    assert resolve_reward_fn("gdpo.rewards.lengths:length") is length
    assert resolve_reward_fn(always_one) is always_one


def test_config_objects_and_dicts_are_duck_typed():
    cfg_like = SimpleNamespace(name="len", fn="length", weight=0.5, kwargs={"max_tokens": 2},
                               condition=SimpleNamespace(on="one", threshold=1.0), fallback=0.0)
    as_dict = {"name": "one", "fn": always_one}
    with RewardBank([cfg_like, as_dict], num_workers=1) as bank:
        res = bank.score(["p"] * 3, ["a", "b", "c"], [1, 2, 3])
    assert res.names == ["len", "one"] and res.weights == [0.5, 1.0]
    assert res.matrix.tolist() == [[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]


# --- scoring and conditioning ----------------------------------------------------------------------------


def test_matrix_names_weights_and_columns_reach_the_functions():
    specs = [
        RewardSpec("correct", "math_correct", weight=2.0),
        RewardSpec("short", "length", weight=0.5, kwargs={"max_tokens": 10}),
        RewardSpec("probe", kwargs_probe, kwargs={"scale": 10.0}),
    ]
    completions = [r"\boxed{4}", r"\boxed{5}", "no answer", r"\boxed{4}"]
    with RewardBank(specs, num_workers=2, chunk_size=1) as bank:
        res = bank.score(["q"] * 4, completions, [5, 11, 3, 10],
                         {"answer": ["4", "4", "4", None], "tag": ["a", "bb", "", "c"]})
    assert isinstance(res, RewardResult)
    assert res.matrix.dtype == torch.float32 and res.matrix.shape == (4, 3)
    assert res.names == ["correct", "short", "probe"] and res.weights == [2.0, 0.5, 1.0]
    m = res.matrix
    assert m[:3, 0].tolist() == [1.0, 0.0, 0.0] and math.isnan(m[3, 0])  # no reference: NaN
    assert m[:, 1].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert m[:, 2].tolist() == [51.0, 112.0, 30.0, 101.0]  # 10 * length + len(tag)
    assert res.errors == {"correct": 0, "short": 0, "probe": 0} and sum(res.timeouts.values()) == 0


def test_length_counts_only_when_correct():
    specs = [
        RewardSpec("correct", "math_correct"),
        RewardSpec("short", "length", kwargs={"max_tokens": 100}, condition=Condition("correct", 1.0)),
    ]
    completions = [r"\boxed{2}", r"\boxed{3}", r"\boxed{2}", r"\boxed{2}"]
    with RewardBank(specs, num_workers=1) as bank:
        res = bank.score(["q"] * 4, completions, [50, 50, 500, 50], {"answer": ["2", "2", "2", None]})
    # correct+short -> 1; wrong -> 0 (though short); correct but long -> 0; no reference -> gate closed -> 0
    assert res.column("short").tolist() == [1.0, 0.0, 0.0, 0.0]
    assert res.column("correct")[:3].tolist() == [1.0, 0.0, 1.0] and math.isnan(res.column("correct")[3])


def test_conditioning_keeps_nan_and_chains_compose():
    specs = [
        RewardSpec("a", echo_score, kwargs={}),
        RewardSpec("b", always_one, condition=Condition("a", 0.5)),
        RewardSpec("c", always_one, condition=Condition("b", 1.0)),
        RewardSpec("d", echo_score, condition=Condition("a", 0.5)),
    ]
    # echo_score reads the `score` column; `a` gates b, b gates c, a gates d (which may be None itself).
    with RewardBank(specs, num_workers=1) as bank:
        res = bank.score(**batch(4, score=[0.9, 0.1, None, 0.7]))
    m = res.matrix
    assert m[:, 1].tolist() == [1.0, 0.0, 0.0, 1.0]  # NaN gate (row 2) counts as not reached
    assert m[:, 2].tolist() == [1.0, 0.0, 0.0, 1.0]  # c sees b after b's own condition
    assert m[0, 3].item() == pytest.approx(0.9) and m[1, 3].item() == 0.0
    assert math.isnan(m[2, 3])  # "does not apply" stays NaN even where the gate is closed


def test_empty_batch():
    with RewardBank([RewardSpec("one", always_one)], num_workers=1) as bank:
        res = bank.score([], [], [], {})
    assert res.matrix.shape == (0, 1)


def test_bad_batch_shapes_are_caller_errors():
    with RewardBank([RewardSpec("one", always_one)], num_workers=1) as bank:
        with pytest.raises(ValueError, match="column 'answer' has 1 entries for 2 completions"):
            bank.score(["p", "p"], ["a", "b"], [1, 1], {"answer": ["x"]})
        with pytest.raises(ValueError, match="1 prompts for 2 completions"):
            bank.score(["p"], ["a", "b"], [1, 1])


# --- fault tolerance -------------------------------------------------------------------------------------


def test_failures_give_the_fallback_and_are_counted(caplog):
    specs = [
        RewardSpec("boom", boom, fallback=-1.0),
        RewardSpec("short", one_short),
        RewardSpec("words", not_numbers),
        RewardSpec("inf", infinite),
        RewardSpec("dies", die, fallback=0.25),
        RewardSpec("ok", always_one),
    ]
    with caplog.at_level(logging.WARNING, logger="gdpo.rewards.bank"):
        with RewardBank(specs, num_workers=2, chunk_size=2) as bank:
            res = bank.score(**batch(4))
            res2 = bank.score(**batch(4))
    for r in (res, res2):
        assert r.column("boom").tolist() == [-1.0] * 4
        assert r.column("short").tolist() == [0.0] * 4
        assert r.column("words").tolist() == [0.0] * 4
        assert r.column("inf").tolist() == [0.0] * 4
        assert r.column("dies").tolist() == [0.25] * 4
        assert r.column("ok").tolist() == [1.0] * 4
        assert r.errors == {"boom": 4, "short": 4, "words": 4, "inf": 4, "dies": 4, "ok": 0}
        assert r.metrics()["rewards/boom/errors"] == 4.0
    # the first traceback of each failing reward is logged once, over both batches
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 5
    assert sum("RuntimeError: boom in reward" in w for w in warnings) == 1
    assert any("returned 1 values for 2 rollouts" in w for w in warnings)
    assert any("'high' for rollout 0 is not a number" in w for w in warnings)
    assert any("worker died (exit code 3)" in w for w in warnings)


def test_hung_call_times_out_worker_is_replaced_and_pool_survives():
    specs = [RewardSpec("hang", hang_on_marker, fallback=0.5), RewardSpec("pid", worker_pid)]
    with RewardBank(specs, num_workers=2, timeout_s=1.0, chunk_size=2) as bank:
        pids_before = {p.proc.pid for p in bank._workers}
        t = time.monotonic()
        res = bank.score(["p"] * 4, ["a", "b", "HANG", "c"], [1] * 4)
        elapsed = time.monotonic() - t
        assert 1.0 <= elapsed < 5
        assert res.column("hang").tolist() == [1.0, 1.0, 0.5, 0.5]  # the hung call's two rows
        assert res.timeouts["hang"] == 2 and res.errors["hang"] == 0
        assert res.seconds["hang"] >= 1.0
        pids_after = {p.proc.pid for p in bank._workers}
        assert len(pids_after) == 2 and len(pids_after - pids_before) == 1  # one killed and replaced
        assert all(p.proc.is_alive() for p in bank._workers)
        killed = (pids_before - pids_after).pop()
        assert not os.path.exists(f"/proc/{killed}") or open(f"/proc/{killed}/stat").read().split()[2] == "Z"
        res2 = bank.score(["p"] * 4, ["a"] * 4, [1] * 4)  # the pool still works
        assert res2.column("hang").tolist() == [1.0] * 4 and res2.timeouts["hang"] == 0


def test_pool_persists_across_calls_and_close_stops_it():
    bank = RewardBank([RewardSpec("pid", worker_pid)], num_workers=2, chunk_size=1)
    first = set(bank.score(**batch(4)).column("pid").tolist())
    second = set(bank.score(**batch(4)).column("pid").tolist())
    assert first == second and len(first) == 2 and os.getpid() not in first
    procs = [w.proc for w in bank._workers]
    bank.close()
    assert all(not p.is_alive() for p in procs)


def test_metrics_ignore_nan():
    with RewardBank([RewardSpec("s", echo_score)], num_workers=1) as bank:
        res = bank.score(**batch(4, score=[1.0, 0.0, None, 0.5]))
    m = res.metrics()
    assert m["rewards/s/mean"] == pytest.approx(0.5)
    assert m["rewards/s/std"] == pytest.approx(math.sqrt(((0.5) ** 2 + 0.5**2 + 0) / 3))
    assert res.nans == {"s": 1}
    assert m["rewards/s/nan_frac"] == 0.25
    assert set(m) == {f"rewards/s/{k}"
                      for k in ("mean", "std", "errors", "timeouts", "memory_kills", "nan_frac", "seconds")}


def test_hostile_inputs_through_every_non_code_builtin():
    gt = '<think>t</think>\n<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n</tool_call>'
    specs = [
        RewardSpec("correct", "math_correct"),
        RewardSpec("int", "integer"),
        RewardSpec("len", "length"),
        RewardSpec("fmt", "format"),
        RewardSpec("toolfmt", "format", kwargs={"template": "toolrl"}),
        RewardSpec("tool", "toolcall_correct"),
    ]
    completions = [
        "",
        "y" * 200_000,
        bytes(range(256)).decode("latin-1") * 40,
        r"\boxed{\frac{1}{2}" + "{" * 5000,
        "}" * 5000 + r"\boxed{1}",
        "🙂 数学 \\boxed{½} <think>\u200b</think>\n<answer>∞</answer>",
        "<tool_call>\n" + '{"name": ' * 10_000 + "\n</tool_call>",
        "\ud800\udfff\x00",
    ]
    n = len(completions)
    with RewardBank(specs, num_workers=2, timeout_s=30) as bank:
        res = bank.score(["p"] * n, completions, [len(c) for c in completions],
                         {"answer": ["1"] * n, "ground_truth": [gt] * n})
    assert sum(res.errors.values()) == 0 and sum(res.timeouts.values()) == 0
    assert not torch.isnan(res.matrix).any()
    assert torch.isfinite(res.matrix).all()
    assert res.column("correct").tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert res.column("tool").tolist() == [-3.0] * n


def test_unknown_kwargs_are_refused_at_start():
    # a built-in's **_ only swallows dataset columns: a typo would silently fall back to the default
    with pytest.raises(ValueError, match=r"reward 'short': unknown kwargs \['max_token'\] for length; allowed: "):
        RewardBank([RewardSpec("short", "length", kwargs={"max_token": 20})], num_workers=1)

    def strict(prompts, completions, *, completion_lengths=None, scale=1.0):
        return [scale] * len(completions)

    with pytest.raises(ValueError, match=r"unknown kwargs \['scal'\] for strict; allowed: scale"):
        RewardBank([RewardSpec("s", strict, kwargs={"scal": 2})], num_workers=1)
    with RewardBank([RewardSpec("s", strict, kwargs={"scale": 2})], num_workers=1) as bank:
        assert bank.score(["p"], ["a"]).matrix.tolist() == [[2.0]]
