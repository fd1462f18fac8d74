"""How far gdpo's training step is from its floor on this CPU, in the vs_trl.py setting.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_floor.py --gdpo-trl-ratio 0.74   # reference (~3 min)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_floor.py --quick              # smoke run

The question it answers: how fast could *any* PyTorch implementation of the same step be here? Measured
side by side in one process (alternating, median over rounds), on the vs_trl.py model (4.1M-parameter Qwen2,
fp32, one thread) and workload (4 prompts x G=8 x 64 new tokens):

generation
- gdpo: `HFRolloutEngine.generate` (prefill, the decode loop, sampling, stop tracking);
- minimal decode, eager: the 64 `FastDecoder` steps gdpo's engine runs, alone (inverse-CDF sampling and
  nothing else: no stop tracking, warpers, log-probs or batch assembly; its logits are checked against the HF
  forward before timing), prefill not timed;
- minimal decode, torch.compile: the same step function compiled (inductor, dynamic shapes);
- GEMMs only: just the step's weight matmuls (29 linears at M = 32 rows, weights cycling as in the loop).

update
- gdpo: reference log-probs (no grad) + policy log-probs and entropy with backward (`token_logprobs`), i.e.
  the update without the optimizer step and the loss arithmetic;
- GEMMs only: the same passes' weight matmuls (forward at M = positions the body runs: each prompt once + the
  completion columns, LM head at M = completion tokens; backward: grad input + grad weight), all else free.

"floor" = GEMMs-only generation + GEMMs-only update: a lower bound for a step that uses PyTorch's CPU matmuls
(attention, norms, RoPE, activations, sampling, the optimizer and all Python counted as zero). Totals are also
printed relative to gdpo's own gen + update measured in the same run (this machine's speed drifts by tens of
percent over minutes, so seconds from different runs do not compare). With --gdpo-trl-ratio (the step ratio
gdpo / TRL that vs_trl.py printed) each total is translated into a ratio to TRL: total / gdpo x that ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gdpo.rollout.fast_decode import FastDecoder  # noqa: E402
from vs_trl import QUICK, Setting, build_assets  # noqa: E402


def linears(model) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of every matmul a decode step runs, in order."""
    out = []
    for ly in model.model.layers:
        a, m = ly.self_attn, ly.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            out.append((lin.weight, lin.bias))
    out.append((model.lm_head.weight, model.lm_head.bias))
    return out


def _left_pad(prompts: list[list[int]], G: int, T: int, pad: int):
    P = max(len(p) for p in prompts)
    rows = len(prompts) * G
    seq = torch.full((rows, P + T), pad, dtype=torch.long)
    valid = torch.zeros((rows, P + T), dtype=torch.long)
    for r in range(rows):
        p = prompts[r // G]
        seq[r, P - len(p) : P] = torch.tensor(p)
        valid[r, P - len(p) :] = 1
    return seq, valid, P


@torch.no_grad()
def mini_generate(model, decoder: FastDecoder, step, seq, valid, P: int, check: bool = False) -> float:
    """gdpo's `FastDecoder` steps (`step`: `decoder.step`, or it compiled) without the rollout engine around
    them: HF prefill of the prompts (untimed), then T steps with inverse-CDF sampling and nothing else.
    Returns the decode seconds."""
    from transformers import DynamicCache

    rows, T = seq.shape[0], seq.shape[1] - P
    pos = (valid.cumsum(-1) - 1).clamp(min=0)  # [rows, P + T]
    cache = model(input_ids=seq[:, : P - 1], attention_mask=valid[:, : P - 1], position_ids=pos[:, : P - 1],
                  past_key_values=DynamicCache(config=model.config), use_cache=True).past_key_values
    decoder.load_cache(cache, P - 1)
    t0 = time.perf_counter()
    for t in range(T):
        n = P - 1 + t
        logits = step(seq[:, n], n)  # [rows, V]
        if check and t == 1:  # the same function as the HF forward over the whole prefix
            ref = model(input_ids=seq[:, : n + 1], attention_mask=valid[:, : n + 1],
                        position_ids=pos[:, : n + 1]).logits[:, -1]
            err = (ref - logits).abs().max().item()
            assert err < 1e-3, f"minimal decode differs from the HF forward: {err}"
        cdf = torch.softmax(logits.float(), -1).cumsum(-1)
        nxt = torch.searchsorted(cdf, torch.rand(rows, 1) * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1)
        seq[:, n + 1] = nxt[:, 0]
    return time.perf_counter() - t0


def gemms_decode(model, rows: int, T: int) -> float:
    lins = linears(model)
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w, _ in lins}
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(T):
            for w, b in lins:
                F.linear(xs[w.shape[1]], w, b)
    return time.perf_counter() - t0


def gemms_update(model, m_body: int, m_head: int) -> float:
    """GEMMs of the reference forward, the policy forward and its backward (grad input, grad weight)."""
    lins = linears(model)
    ms = [m_body] * (len(lins) - 1) + [m_head]
    xs = {(m, w.shape[1]): torch.randn(m, w.shape[1]) for (w, _), m in zip(lins, ms)}
    gs = {(m, w.shape[0]): torch.randn(m, w.shape[0]) for (w, _), m in zip(lins, ms)}
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(2):  # reference forward, policy forward
            for (w, b), m in zip(lins, ms):
                F.linear(xs[m, w.shape[1]], w, b)
        for (w, _), m in zip(reversed(lins), reversed(ms)):  # policy backward
            g = gs[m, w.shape[0]]
            torch.mm(g, w)
            torch.mm(g.t(), xs[m, w.shape[1]])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--rounds", type=int, default=None, help="alternated rounds (default 5; quick 1)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the torch.compile line (~20 s to compile; --quick skips it too)")
    ap.add_argument("--gdpo-trl-ratio", type=float, default=None,
                    help="step ratio gdpo / TRL printed by vs_trl.py (turns the totals into ratios to TRL)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    s = QUICK if a.quick else Setting()
    rounds = a.rounds or (1 if a.quick else 5)
    from gdpo.policy.model import load_causal_lm, load_tokenizer, token_logprobs
    from gdpo.rollout.hf import HFRolloutEngine
    from gdpo.rollout.types import SamplingParams

    with tempfile.TemporaryDirectory(prefix="step_floor_") as tmp:
        model_dir, prompts_file = build_assets(s, Path(tmp))
        model = load_causal_lm(model_dir, dtype=torch.float32, device="cpu")
        ref = load_causal_lm(model_dir, dtype=torch.float32, device="cpu").eval().requires_grad_(False)
        tok = load_tokenizer(model_dir)
        texts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()[: s.prompts]]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    G, T, rows = s.group, s.new_tokens, s.prompts * s.group
    engine = HFRolloutEngine(model, tok, SamplingParams(max_new_tokens=T, min_new_tokens=T, temperature=1.0))
    model.eval()
    seq, valid, P0 = _left_pad(prompts, G, T, tok.pad_token_id)  # the minimal loop's rows (same prompts)
    decoder = FastDecoder(model, (valid.cumsum(-1) - 1).clamp(min=0), valid)

    batch = engine.generate(prompts, G)
    ids, mask, P = batch.input_ids(), batch.attention_mask(), batch.prompt_ids.shape[1]

    def gdpo_update() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            token_logprobs(ref, ids, mask, P)
        model.train()
        out = token_logprobs(model, ids, mask, P, return_entropy=True)
        (out.logprobs.sum() + 0.0 * out.entropy.sum()).backward()
        model.zero_grad(set_to_none=True)
        model.eval()
        return time.perf_counter() - t0

    m_body = s.prompts * P + rows * (T - 1)  # positions the body runs (prompts once per group)
    lines = {
        "gen: gdpo (HF rollout engine)": lambda: _timed(lambda: engine.generate(prompts, G)),
        "gen: minimal decode, eager": lambda: mini_generate(model, decoder, decoder.step, seq, valid, P0),
        "gen: GEMMs only": lambda: gemms_decode(model, rows, T),
        "update: gdpo (ref + policy fwd/bwd)": gdpo_update,
        "update: GEMMs only": lambda: gemms_update(model, m_body, rows * T),
    }
    mini_generate(model, decoder, decoder.step, seq, valid, P0, check=True)  # correctness, then warm-up
    if not (a.no_compile or a.quick):
        t0 = time.perf_counter()
        cstep = torch.compile(decoder.step, dynamic=True)
        mini_generate(model, decoder, cstep, seq, valid, P0, check=True)
        print(f"torch.compile of the decode step: {time.perf_counter() - t0:.1f} s (first call, not counted)")
        compiled = lambda: mini_generate(model, decoder, cstep, seq, valid, P0)  # noqa: E731
        lines["gen: minimal decode, torch.compile"] = compiled
    for fn in lines.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in lines}
    for _ in range(rounds):
        for k, fn in lines.items():
            times[k].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}

    gdpo_step = med["gen: gdpo (HF rollout engine)"] + med["update: gdpo (ref + policy fwd/bwd)"]
    best_gen = min(v for k, v in med.items() if k.startswith("gen: minimal"))
    totals = {
        "gdpo gen + update": gdpo_step,
        "minimal decode + gdpo update": best_gen + med["update: gdpo (ref + policy fwd/bwd)"],
        "minimal decode + GEMM-only update": best_gen + med["update: GEMMs only"],
        "floor (GEMMs only, all else free)": med["gen: GEMMs only"] + med["update: GEMMs only"],
    }
    r = a.gdpo_trl_ratio
    print(f"\nstep floor: {s.prompts} prompts x G={G} x {T} new tokens, hidden {s.hidden}, "
          f"{s.layers} layers, CPU, 1 thread, fp32; median of {rounds} alternated rounds")
    print(f"{'line':42s} {'seconds':>8s}")
    for k in lines:
        print(f"{k:42s} {med[k]:8.4f}")
    print(f"\n{'gen + update':42s} {'seconds':>8s} {'/ gdpo':>7s}" + (f" {'/ TRL':>6s}" if r else ""))
    for k, v in totals.items():
        print(f"{k:42s} {v:8.4f} {v / gdpo_step:7.2f}" + (f" {v / gdpo_step * r:6.2f}" if r else ""))
    if r:
        print(f"(/ TRL = / gdpo x {r:.2f}, the step ratio vs_trl.py measured; goal <= 0.60)")
    print("command: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_floor.py " + " ".join(sys.argv[1:]))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
