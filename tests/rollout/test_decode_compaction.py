"""Finished rows leave the decode batch: fewer rows decoded per step, the same tokens and log-probs."""

import pytest
import torch

from gdpo.rollout import HFRolloutEngine, SamplingParams
from gdpo.rollout import fast_decode as fd
from gdpo.testing import tiny_model, tiny_tokenizer


def _rollout(model, tok, compact: bool, fast: bool):
    # half the byte vocabulary ends a row: rows finish at geometric, different times
    sp = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=200, stop_token_ids=tuple(range(0, 128)),
                        return_logprobs=True)
    engine = HFRolloutEngine(model, tok, sp, fast_decode=fast, compact_finished=compact)
    torch.manual_seed(5)
    return engine.generate([[72, 105, 32], [50, 43, 50, 61, 63], [70]], 8)


@pytest.mark.parametrize("fast", [True, False])
def test_compaction_keeps_tokens_and_decodes_fewer_rows(monkeypatch, fast):
    tok = tiny_tokenizer()
    model = tiny_model(tokenizer=tok, seed=3).eval()
    seen: list[int] = []
    step = fd.FastDecoder.step
    monkeypatch.setattr(fd.FastDecoder, "step", lambda self, ids, n: (seen.append(len(ids)), step(self, ids, n))[1])
    forward = type(model).forward

    def counting_forward(self, *a, **kw):
        seen.append(kw["input_ids"].shape[0])
        return forward(self, *a, **kw)

    monkeypatch.setattr(type(model), "forward", counting_forward)
    seen.clear()
    full = _rollout(model, tok, compact=False, fast=fast)
    rows_full = sum(seen)
    seen.clear()
    comp = _rollout(model, tok, compact=True, fast=fast)
    rows_comp = sum(seen)
    assert torch.equal(full.completion_ids, comp.completion_ids)
    assert torch.equal(full.completion_lengths, comp.completion_lengths)
    assert full.completion_texts == comp.completion_texts
    torch.testing.assert_close(full.sampling_logprobs, comp.sampling_logprobs, atol=1e-5, rtol=0)
    lengths = comp.completion_lengths
    assert lengths.min() < lengths.max() and (lengths < 24).all()  # ragged, every row ended on a stop id
    assert rows_comp < 0.7 * rows_full, (rows_comp, rows_full)  # decode cost follows the live rows
    assert min(seen) < 24  # the batch really shrank
