"""Tied convolution vs a dense convolution with the expanded kernel, and D4-equivariant sampling
with EquivariantUNet (one call per step) vs frame averaging around a plain UNet (8 calls per step).

    python benchmarks/bench_tied_conv.py            # op + end-to-end, writes results/tied_conv.json
    python benchmarks/bench_tied_conv.py --quick    # fewer repeats

Op case (issue 4): D4, 3×3, 64 -> 64 channels, 32×32, batch 32, fp32. Baselines:
- "conv2d (dense kernel)": nn.Conv2d holding the expanded symmetric kernel (oneDNN), the cost of
  a plain convolution;
- "parametrize (expand + conv2d)": the kernel expanded from its orbit values on every call, what a
  torch.nn.utils.parametrize-based tied layer costs (needed for training);
- "compile(parametrize)": torch.compile of the latter;
- "tied reference": symfast/reference/tied_conv2d.py, eager;
- "TiedConv2d (cpu)": the C++ kernel (stencil + GEMM).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, paired_ratio, print_table, write_results  # noqa: E402

from symfast import equivariance_error, symmetrize  # noqa: E402
from symfast.groups import get  # noqa: E402
from symfast.nn import EquivariantUNet, TiedConv2d, UNet  # noqa: E402
from symfast.ops.tied_conv2d import tied_conv2d  # noqa: E402
from symfast.reference.tied_conv2d import expand_weight  # noqa: E402


def _fwd_bwd(fn, x, params, grad):
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        fn(x).backward(grad)
    return step


def bench_op(batch: int, channels: int, size: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    tied = TiedConv2d(channels, channels, 3, "d4")
    dense = torch.nn.Conv2d(channels, channels, 3, padding=1)
    with torch.no_grad():
        dense.weight.copy_(tied.expanded_weight())
        dense.bias.copy_(tied.bias)
    theta, bias, orbits = tied.weight, tied.bias, tied.orbits

    def parametrized(x):
        return F.conv2d(x, expand_weight(theta, orbits), bias, padding=1)

    compiled = torch.compile(parametrized)

    def tied_reference(x):
        return tied_conv2d(x, theta, bias, 3, "d4", 1, 1, backend="reference")

    variants = {
        "conv2d (dense kernel)": (dense, list(dense.parameters())),
        "parametrize (expand + conv2d)": (parametrized, [theta, bias]),
        "compile(parametrize)": (compiled, [theta, bias]),
        "tied reference": (tied_reference, [theta, bias]),
        "TiedConv2d (cpu)": (tied, [theta, bias]),
    }
    x = torch.randn(batch, channels, size, size)
    with torch.no_grad():
        ref = dense(x)
    grad = torch.randn_like(ref)
    xg = x.clone().requires_grad_()
    dense_flops = 2 * batch * channels * channels * 9 * size * size
    rows = []
    for name, (fn, params) in variants.items():
        with torch.no_grad():
            out = fn(x)
            err = float((out - ref).norm() / ref.norm())
            t_fwd = median_time(lambda: fn(x), repeats)
        t_fb = median_time(_fwd_bwd(fn, xg, params, grad), repeats)
        rows.append({"variant": name, "fwd_ms": t_fwd * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                     "dense_equiv_GFLOPs": dense_flops / t_fwd / 1e9, "rel_err": err})
    base = rows[0]
    for r in rows:
        r["fwd_speedup_vs_conv2d"] = base["fwd_ms"] / r["fwd_ms"]
        r["fwd_bwd_speedup_vs_conv2d"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    with torch.no_grad():
        rows[-1]["fwd_speedup_paired"] = paired_ratio(lambda: dense(x), lambda: tied(x), 2 * repeats)
    return rows


@torch.no_grad()
def euler_sample(model, x, sigmas):
    """Deterministic Euler steps of the probability-flow ODE dx/dσ = (x − D(x, σ)) / σ."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, s)
        x = x + (s_next - s) * (x - denoised) / s
    return x


def bench_sampling(batch: int, size: int, channels: tuple[int, ...], steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    group = get("d4")
    tied = EquivariantUNet(3, 3, channels=channels, group=group).eval()
    plain = UNet(3, 3, channels=channels).eval()
    fa = symmetrize(plain, group)
    sigmas = torch.linspace(10.0, 0.05, steps + 1).tolist()
    x = torch.randn(batch, 3, size, size) * sigmas[0]
    t_tied = median_time(lambda: euler_sample(tied, x, sigmas), repeats, warmup=1)
    t_fa = median_time(lambda: euler_sample(fa, x, sigmas), repeats, warmup=1)
    sample = {"tied": lambda z: euler_sample(tied, z, sigmas),
              "fa": lambda z: euler_sample(fa, z, sigmas)}
    return {
        "batch": batch, "size": size, "channels": list(channels), "steps": steps,
        "params_tied": sum(p.numel() for p in tied.parameters()),
        "params_plain": sum(p.numel() for p in plain.parameters()),
        "tied_s_per_step": t_tied / steps, "fa_s_per_step": t_fa / steps,
        "speedup": t_fa / t_tied,
        "equivariance_error_tied": equivariance_error(sample["tied"], x, group),
        "equivariance_error_fa": equivariance_error(sample["fa"], x, group),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--skip-e2e", action="store_true", help="only the op benchmark")
    parser.add_argument("--skip-op", action="store_true", help="only the end-to-end benchmark")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 is steadier on a shared machine")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 15
    payload = {}
    # On the shared 2-core machine the 2-thread timings swing 5-15x with the other users' load
    # (tied 0.022 to 0.33 s/step in runs minutes apart); --threads 1 gives steadier ratios.
    if not args.skip_e2e:
        e2e = bench_sampling(batch=4, size=32, channels=(32, 64, 64), steps=4,
                             repeats=3 if args.quick else 5)
        print(f"D4-equivariant Euler sampling ({torch.get_num_threads()} threads): "
              "EquivariantUNet (1 call/step) vs symmetrize(UNet) (8 calls/step)")
        print_table([e2e], ["batch", "size", "steps", "params_tied", "params_plain",
                            "tied_s_per_step", "fa_s_per_step", "speedup",
                            "equivariance_error_tied", "equivariance_error_fa"])
        payload["sampling"] = e2e
    if not args.skip_op:
        rows = bench_op(batch=32, channels=64, size=32, repeats=repeats)
        print("\nTiedConv2d D4 3x3, 64->64, 32x32, batch 32, fp32 "
              f"({torch.get_num_threads()} threads)")
        print_table(rows, ["variant", "fwd_ms", "fwd_bwd_ms", "fwd_speedup_vs_conv2d",
                           "fwd_bwd_speedup_vs_conv2d", "dense_equiv_GFLOPs", "rel_err"])
        print("TiedConv2d (cpu) forward vs conv2d, median of back-to-back ratios: "
              f"{rows[-1]['fwd_speedup_paired']:.2f}x")
        payload["op"] = rows
    name = "tied_conv" if not (args.skip_op or args.skip_e2e) else \
        ("tied_conv_e2e" if args.skip_op else "tied_conv_op")
    print(f"\nwrote {write_results(f'{name}_t{torch.get_num_threads()}', payload)}")


if __name__ == "__main__":
    main()
