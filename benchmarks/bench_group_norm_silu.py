"""group_norm_silu: F.silu(F.group_norm(x + shift)) in eager PyTorch vs torch.compile of it vs
symfast's fused CPU kernel, forward and forward+backward.

On the EquivariantUNet's shapes at batch 64 (8 groups, fp32, with the time-embedding shift as in
the blocks' second norm): median time, GB/s (the bytes the op must move: x read and z written
forward; x and grad_z read and grad_x written backward) and the share of the copy bandwidth
measured in the same run.
Run: python benchmarks/bench_group_norm_silu.py [--repeats N] [--quick]   (or: symfast bench group-norm-silu)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth, median_time, print_table, write_results  # noqa: E402

from symfast.ops import group_norm_silu  # noqa: E402
from symfast.profiling import costs  # noqa: E402
from symfast.reference.group_norm_silu import group_norm_silu as reference  # noqa: E402

SHAPES = [(64, 96, 32, 32), (64, 32, 32, 32), (64, 64, 16, 16), (64, 128, 8, 8)]
GROUPS = 8


def _inputs(shape):
    b, c = shape[:2]
    x = torch.randn(shape, requires_grad=True)
    params = [torch.randn(b, c), 1 + 0.1 * torch.randn(c), 0.1 * torch.randn(c)]
    return x, [p.requires_grad_() for p in params], torch.randn(shape)


def run(repeats: int = 20, shapes=SHAPES) -> tuple[list[dict], float]:
    bandwidth = copy_bandwidth()
    compiled = torch.compile(reference)
    rows = []
    for shape in shapes:
        x, (shift, weight, bias), grad_z = _inputs(shape)
        fns = {
            "eager": lambda: reference(x, GROUPS, weight, bias, 1e-5, shift),
            "torch.compile": lambda: compiled(x, GROUPS, weight, bias, 1e-5, shift),
            "symfast cpu": lambda: group_norm_silu(x, GROUPS, weight, bias, 1e-5, shift=shift,
                                                   backend="cpu"),
        }
        want = reference(x.double(), GROUPS, weight.double(), bias.double(), 1e-5, shift.double())
        for fn in fns.values():
            torch.testing.assert_close(fn().double(), want, rtol=1e-5, atol=1e-5)
        for mode in ("fwd", "fwd+bwd"):
            moved = costs.group_norm_silu(x, GROUPS, backward=mode == "fwd+bwd").bytes
            times = {}
            for variant, fn in fns.items():
                if mode == "fwd":
                    with torch.no_grad():
                        times[variant] = median_time(fn, repeats=repeats, warmup=3)
                else:
                    # autograd.grad: no accumulation into .grad (an extra pass over x)
                    times[variant] = median_time(
                        lambda fn=fn: torch.autograd.grad(fn(), (x, shift, weight, bias), grad_z),
                        repeats=repeats, warmup=3)
            for variant, seconds in times.items():
                rows.append({
                    "shape": "x".join(map(str, shape)), "mode": mode, "variant": variant,
                    "ms": seconds * 1e3, "GB/s": moved / seconds / 1e9,
                    "share_of_copy_bw": moved / seconds / bandwidth,
                    "speedup_vs_eager": times["eager"] / seconds,
                    "speedup_vs_compile": times["torch.compile"] / seconds,
                    "floor_ms": moved / bandwidth * 1e3,
                })
    return rows, bandwidth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="the largest shape only")
    args = parser.parse_args(argv)
    rows, bandwidth = run(args.repeats, SHAPES[:1] if args.quick else SHAPES)
    print(f"copy bandwidth measured in this run: {bandwidth / 1e9:.1f} GB/s "
          f"({torch.get_num_threads()} threads)")
    print_table(rows, ["shape", "mode", "variant", "ms", "GB/s", "share_of_copy_bw",
                       "speedup_vs_eager", "speedup_vs_compile", "floor_ms"])
    # --quick measures fewer shapes: not over the whole committed run
    path = write_results("group_norm_silu", {"copy_bandwidth_GBps": bandwidth / 1e9, "rows": rows},
                         subset="quick" if args.quick else None)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
