"""classifier_select forward+backward at B=512, F=512, K=16, C=50 (issue 5): reference eager vs
torch.compile(reference) vs the cpu kernel, against the GEMM floor measured in the same run.

The floor is the three GEMMs the op cannot avoid (scores = h·Wᵀ, grad h = dS·W, grad W = dSᵀ·h
with W the stacked (K + K·C, F) weights), timed as plain torch.mm calls of those shapes, each
threaded by the BLAS. The cpu kernel runs the same GEMMs but, with enough rows per thread, gives
each thread its own block of rows (single-threaded GEMMs, no BLAS barriers): it can run below this
floor when the BLAS's own threading scales worse than that.
Variants are timed in interleaved rounds (median over rounds of per-round medians), so a burst of
load on a shared machine hits them all alike.

    python benchmarks/bench_classifier_select.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, print_table, write_results  # noqa: E402

from symfast.ops.classifier_select import classifier_select  # noqa: E402
from symfast.profiling import costs  # noqa: E402
from symfast.reference.classifier_select import classifier_select as reference  # noqa: E402

B, F, K, C = 512, 512, 16, 50
NAME = "classifier_select fwd+bwd"


def _inputs(gen: torch.Generator):
    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).requires_grad_()
    return [rnd(B, F), rnd(K, F, scale=F ** -0.5), rnd(K), rnd(K, C, F, scale=F ** -0.5), rnd(K, C)]


def _fwd_bwd(fn, args, grad):
    def step():
        return torch.autograd.grad(fn(*args), args, grad)
    return step


def run(rounds: int = 5, repeats: int = 10) -> list[dict]:
    """Rows: name, variant, ms, GFLOP/s (GEMM flops / time), share of the GEMM floor
    (floor ms / ms), speedup vs eager."""
    gen = torch.Generator().manual_seed(0)
    args = _inputs(gen)
    grad = torch.randn(B, C, generator=gen)
    n = K + K * C
    w_all, d_scores = torch.randn(n, F, generator=gen), torch.randn(B, n, generator=gen)
    h = args[0].detach()
    gemm_flops = costs.classifier_select(*args, backward=True).flops

    def gemm_floor():
        torch.mm(h, w_all.t())
        torch.mm(d_scores, w_all)
        torch.mm(d_scores.t(), h)

    compiled = torch.compile(reference)
    variants = {
        "GEMM floor (3 x torch.mm)": gemm_floor,
        "reference eager": _fwd_bwd(reference, args, grad),
        "torch.compile(reference)": _fwd_bwd(compiled, args, grad),
        "cpu kernel": _fwd_bwd(lambda *a: classifier_select(*a, backend="cpu"), args, grad),
    }
    for fn in variants.values():  # compile, load the extension, warm the caches
        fn()
    samples = {v: [] for v in variants}
    for _ in range(rounds):
        for v, fn in variants.items():
            samples[v].append(median_time(fn, repeats=repeats, warmup=1))
    seconds = {v: statistics.median(s) for v, s in samples.items()}
    floor, eager = seconds["GEMM floor (3 x torch.mm)"], seconds["reference eager"]
    return [{"name": NAME, "variant": v, "ms": s * 1e3, "GFLOP/s": gemm_flops / s / 1e9,
             "share_of_gemm_floor": floor / s, "speedup_vs_eager": eager / s}
            for v, s in seconds.items()]


def main() -> None:
    # no options; the parser gives --help (symfast bench passes it on) and refuses stray ones
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    rows = run()
    print(f"{NAME}: B={B}, F={F}, K={K}, C={C}, {torch.get_num_threads()} threads")
    print_table(rows, ["variant", "ms", "GFLOP/s", "share_of_gemm_floor", "speedup_vs_eager"])
    by = {r["variant"]: r["ms"] for r in rows}
    summary = {"cpu_vs_eager": by["reference eager"] / by["cpu kernel"],
               "cpu_vs_compile": by["torch.compile(reference)"] / by["cpu kernel"],
               "cpu_share_of_gemm_floor": by["GEMM floor (3 x torch.mm)"] / by["cpu kernel"],
               "targets": {"cpu_vs_eager": 1.5, "cpu_vs_compile": 1.1, "cpu_share_of_gemm_floor": 0.85}}
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()})
    path = write_results("classifier_select", {"shape": {"B": B, "F": F, "K": K, "C": C},
                                               "rows": rows, "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
