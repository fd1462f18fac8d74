"""The fused Triton kernel against the float64 reference: on CPU through TRITON_INTERPRET=1, on a GPU if any."""

import pytest
import torch

from gdpo.advantage import compute_advantages, reference_advantages, triton_available

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _rewards(n, k, g, seed, device):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 3, (n, k), generator=gen).float() * torch.rand(n, k, generator=gen)
    r[torch.rand(n, k, generator=gen) < 0.2] = float("nan")
    r[:g, :] = 0.25  # a group where every reward is constant
    if n >= 3 * g:
        r[g : 2 * g, 0] = float("nan")  # a reward that applies to none of a group
        r[2 * g + 1, :] = float("nan")  # a rollout to which no reward applies
    return r.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("estimator", ["grpo", "grpo_no_std", "gdpo", "dler"])
@pytest.mark.parametrize("n,k,g", [(12, 1, 2), (60, 3, 5), (96, 2, 16), (48, 8, 3)])
def test_triton_matches_float64_reference(device, estimator, n, k, g):
    if not triton_available(device):
        pytest.skip("no Triton backend for this device (TRITON_INTERPRET unset)")
    r = _rewards(n, k, g, seed=n + k, device=device)
    w = torch.linspace(0.5, 2.0, k).tolist()
    got = compute_advantages(r, g, estimator, weights=w, backend="triton")
    ref = reference_advantages(r.cpu(), g, estimator, weights=w)
    assert got.dtype == torch.float32 and got.device.type == device
    err = (got.cpu().double() - ref).abs().max() / ref.abs().max().clamp(min=1)
    assert err < 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("batch_norm", [True, False])
def test_triton_switch_combinations_and_bf16_input(batch_norm):
    r = _rewards(40, 3, 4, seed=3, device="cpu")
    ref = reference_advantages(r, 4, "gdpo", group_std=False, batch_norm=batch_norm)
    got = compute_advantages(r, 4, "gdpo", group_std=False, batch_norm=batch_norm, backend="triton")
    assert ((got.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    rb = torch.randint(0, 2, (32, 2)).to(torch.bfloat16)  # binary rewards are exact in bf16
    ref_b = reference_advantages(rb.float(), 8, "gdpo")
    got_b = compute_advantages(rb, 8, "gdpo", backend="triton")
    assert ((got_b.double() - ref_b).abs().max() / ref_b.abs().max()) < 1e-5


def test_triton_rejects_inf_and_reduce_hook():
    r = torch.rand(16, 2)
    r[5, 1] = float("-inf")
    with pytest.raises(ValueError, match="inf"):
        compute_advantages(r, 4, backend="triton")
    r = torch.rand(32, 2)
    whole = compute_advantages(r, 4, "gdpo", backend="torch")
    from gdpo.advantage.triton_kernel import partials_to_moments, triton_group_stage
    from gdpo.advantage.core import resolve_spec

    spec = resolve_spec("gdpo")
    tot = sum(partials_to_moments(triton_group_stage(h, 4, torch.ones(2), spec, 1e-4)[1]).as_tensor()
              for h in (r[:16], r[16:]))
    parts = [compute_advantages(h, 4, "gdpo", backend="triton", reduce_moments=lambda m: tot) for h in (r[:16], r[16:])]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda_large():
    r = torch.randint(0, 2, (1 << 20, 3), device="cuda").float()
    got = compute_advantages(r, 16, "gdpo")
    ref = reference_advantages(r.cpu(), 16, "gdpo")
    assert ((got.cpu().double() - ref).abs().max() / ref.abs().max()) < 1e-5
