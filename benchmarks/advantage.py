"""Advantage engine throughput: eager torch vs torch.compile vs the fused Triton kernel (GPU only).

    python benchmarks/advantage.py                 # full sweep, N = 4k..16M, K in {1, 2, 3, 8}
    python benchmarks/advantage.py --quick         # smoke run (the test suite runs this)

Effective GB/s counts the bytes that must move: read the rewards once (N*K*elem) and write the advantages
(N*4). The device copy bandwidth (clone of a tensor as large as the rewards) is measured in the same run, and
the table gives each backend's share of it. Times are medians after warm-up; all backends run interleaved in
one process so machine noise hits them alike. Estimator: gdpo (the heaviest: per-reward stats + batch norm).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gdpo.advantage import compute_advantages  # noqa: E402
from gdpo.advantage.core import batch_moments, batch_normalize, check_inputs, resolve_spec, torch_advantages  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _eager(r, g):
    return compute_advantages(r, g, "gdpo", backend="torch")


def _compiled_fn():
    spec = resolve_spec("gdpo")

    def f(r, w, g: int):
        x, ok = torch_advantages(r, g, w, spec, 1e-4)
        return batch_normalize(x, ok, batch_moments(x, ok), eps=1e-4)

    return torch.compile(f, dynamic=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two small sizes, one rep: a smoke test")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="*", default=None, help="N values (rows)")
    p.add_argument("--ks", type=int, nargs="*", default=[1, 2, 3, 8])
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build on CPU)")
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    dev = args.device
    sizes = args.sizes or ([4096, 65536] if args.quick else [4096, 65536, 1 << 20, 1 << 22, 1 << 24])
    ks = [1, 3] if args.quick else args.ks
    reps = args.reps or (1 if args.quick else (20 if dev == "cuda" else 3))
    g = args.group_size
    use_triton = dev == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    use_compile = not (args.no_compile or args.quick)

    print(f"device={dev} torch={torch.__version__} group_size={g} reps={reps} estimator=gdpo")
    print("command: python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])))
    hdr = f"{'N':>10} {'K':>2} {'backend':>8} {'ms':>10} {'GB/s':>8} {'%copy':>6} {'vs eager':>9}"
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        for k in ks:
            if n * k * 4 > (8 << 30) and dev == "cpu":
                continue
            r = torch.randint(0, 2, (n, k), device=dev).float()
            nbytes = n * k * r.element_size() + n * 4
            copy_s = _time(lambda: r.clone(), dev, reps)
            copy_gbs = 2 * r.numel() * r.element_size() / copy_s / 1e9
            rows = []
            t_eager = _time(lambda: _eager(r, g), dev, reps)
            rows.append(("eager", t_eager))
            if use_compile:
                torch._dynamo.reset()  # one static-shape graph per size, not a recompile-limit fallback
                compiled = _compiled_fn()
                w = check_inputs(r, g, None)
                rows.append(("compile", _time(lambda: compiled(r, w, g), dev, reps, warmup=2)))
            if use_triton and (dev == "cuda" or n * k <= 65536):  # the CPU interpreter is ~3 ms a program
                rows.append(("triton", _time(lambda: compute_advantages(r, g, "gdpo", backend="triton"), dev, reps)))
            for name, t in rows:
                gbs = nbytes / t / 1e9
                print(
                    f"{n:>10} {k:>2} {name:>8} {t * 1e3:>10.3f} {gbs:>8.2f} {100 * gbs / copy_gbs:>5.0f}% "
                    f"{t_eager / t:>8.2f}x"
                )
            print(f"{n:>10} {k:>2} {'copy':>8} {copy_s * 1e3:>10.3f} {copy_gbs:>8.2f}  (clone of the rewards)")
            r = None  # free the device memory before the next size


if __name__ == "__main__":
    main()
