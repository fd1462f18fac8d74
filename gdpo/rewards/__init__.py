"""The reward bank: built-in rewards, conditioning and a fault-tolerant parallel executor.

    from gdpo.rewards import RewardBank, RewardSpec, Condition
    bank = RewardBank([
        RewardSpec("correct", "math_correct"),
        RewardSpec("short", "length", kwargs={"max_tokens": 4000}, condition=Condition("correct", 1.0)),
    ])
    result = bank.score(prompts, completions, completion_lengths, {"answer": answers})
    result.matrix  # [N, 2] float32, NaN where a reward does not apply

See docs/rewards.md.
"""

from gdpo.rewards.bank import BUILTINS, Condition, RewardBank, RewardResult, RewardSpec, resolve_reward_fn
from gdpo.rewards.code import code_bug, code_pass
from gdpo.rewards.formats import format_reward
from gdpo.rewards.lengths import length, overlong, truncate_rewards
from gdpo.rewards.math import integer, math_correct
from gdpo.rewards.toolcall import toolcall_correct

# The built-in names of the config (`fn: format` etc.), importable under the same names. (The modules
# are formats.py / lengths.py so that these names never shadow a submodule.)
format = format_reward  # noqa: A001 - the config name of the reward shadows the builtin only here

__all__ = [
    "BUILTINS",
    "Condition",
    "RewardBank",
    "RewardResult",
    "RewardSpec",
    "resolve_reward_fn",
    "math_correct",
    "integer",
    "length",
    "overlong",
    "truncate_rewards",
    "format",
    "format_reward",
    "toolcall_correct",
    "code_pass",
    "code_bug",
]
