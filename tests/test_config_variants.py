"""Config keys of the related-work switches (GSPO, CISPO, SAPO, DAPO, GFPO, RLOO, DLER): defaults, the shipped
GSPO config, and the combinations that are refused at start because a value would not take effect."""

from pathlib import Path

import pytest

from gdpo.config import ConfigError, field_docs, load_config

ROOT = Path(__file__).resolve().parents[1]

KEYS = ["loss.importance_level", "loss.objective", "loss.cispo_eps_max", "loss.sapo_tau_pos", "loss.sapo_tau_neg",
        "loss.mask_truncated", "advantage.baseline", "advantage.gfpo_keep", "advantage.gfpo_metric",
        "rewards.truncated_value"]


def test_defaults_keep_todays_behaviour_and_every_key_is_documented():
    cfg = load_config(None)
    assert (cfg.loss.importance_level, cfg.loss.objective, cfg.loss.mask_truncated) == ("token", "clip", False)
    assert (cfg.loss.cispo_eps_max, cfg.loss.sapo_tau_pos, cfg.loss.sapo_tau_neg) == (5.0, 1.0, 1.05)
    assert (cfg.advantage.baseline, cfg.advantage.gfpo_keep, cfg.advantage.gfpo_metric) == ("mean", None, "length")
    assert cfg.rewards.truncated_value is None
    docs = {k: d for k, _, d in field_docs()}
    for k in KEYS:
        assert len(docs[k]) > 20, k


def test_gspo_config():
    cfg = load_config(ROOT / "configs" / "tiny_gspo.yaml")
    assert cfg.loss.importance_level == "sequence" and cfg.loss.aggregation == "seq_mean_token_mean"
    assert (cfg.loss.eps_low, cfg.loss.eps_high) == (3e-4, 4e-4)


@pytest.mark.parametrize("overrides", [
    ["advantage.estimator=dler"],
    ["advantage.baseline=leave_one_out"],
    ["advantage.gfpo_keep=4", "rollout.group_size=8", "advantage.gfpo_metric=efficiency"],
    ["advantage.gfpo_keep=0"],
    ["loss.objective=cispo", "loss.cispo_eps_max=3"],
    ["loss.objective=sapo", "loss.sapo_tau_neg=2"],
    ["loss.mask_truncated=true", "rewards.truncated_value=0"],
    ["loss.importance_level=sequence", "loss.aggregation=seq_mean_token_mean", "loss.objective=sapo"],
])
def test_accepted(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize("overrides,message", [
    (["advantage.gfpo_keep=8", "rollout.group_size=8"],
     "advantage.gfpo_keep: 8 must be >= 2 and < rollout.group_size 8"),
    (["advantage.gfpo_keep=1"], "advantage.gfpo_keep: 1 must be >= 2"),
    (["advantage.gfpo_keep=-1"], "advantage.gfpo_keep: -1 is out of range"),
    (["advantage.gfpo_metric=efficiency"], "advantage.gfpo_metric: 'efficiency' has no effect without"),
    (["advantage.baseline=leave_one_out", "advantage.backend=triton"],
     "advantage.baseline: 'leave_one_out' is computed"),
    (["advantage.baseline=median"], "advantage.baseline: 'median' is not allowed"),
    (["loss.importance_level=sequence"], "loss.aggregation: 'token_mean' with loss.importance_level sequence"),
    (["loss.objective=cispo", "loss.eps_high=0.28"], "loss.eps_high: 0.28 has no effect with loss.objective 'cispo'"),
    (["loss.cispo_eps_max=3"], "loss.cispo_eps_max: 3.0 has no effect with loss.objective 'clip'"),
    (["loss.objective=cispo", "loss.sapo_tau_pos=2"], "loss.sapo_tau_pos: 2.0 has no effect"),
    (["loss.cispo_eps_max=0"], "loss.cispo_eps_max: 0.0 is out of range"),
    (["loss.objective=ppo"], "loss.objective: 'ppo' is not allowed"),
])
def test_refused_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)
