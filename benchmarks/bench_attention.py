"""attention_pool forward+backward at B=256, L=64, V=50,000, d=128, d_k=64 (issue 5): plain eager
(gather, softmax, einsum), the F.embedding_bag(per_sample_weights=...) version, torch.compile of the
reference and the cpu kernel; then classifier_select's rows from bench_classifier_select.run()
when that script exists. Results: benchmarks/results/attention.json.

The floor is memory (symfast.profiling.costs.attention_pool, forward + backward): the gathered
rows of the positions within each sentence's length read once (sum(lengths)·(d + d_k) values;
the padding's rows do not move the output), the tokens and pooled output, plus the dense gradient
tables written once (V·(d + d_k) values), over the copy bandwidth measured in the same run.
Variants are timed in interleaved rounds (median over rounds of per-round medians), so a burst of
load on a shared machine hits them all alike.

    python benchmarks/bench_attention.py
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth, median_time, print_table, write_results  # noqa: E402

from symfast.ops.attention_pool import attention_pool  # noqa: E402
from symfast.profiling import costs  # noqa: E402
from symfast.reference.attention_pool import attention_pool as reference  # noqa: E402
from symfast.reference.attention_pool import attention_scores  # noqa: E402

B, L, V, D, DK = 256, 64, 50_000, 128, 64
NAME = "attention_pool fwd+bwd"


def _floor_bytes(lengths: torch.Tensor) -> float:
    meta = [torch.empty(shape, device="meta") for shape in ((V, D), (V, DK), (DK,))]
    tokens = torch.empty((B, L), dtype=torch.int64, device="meta")
    return costs.attention_pool(tokens, lengths, *meta, backward=True).bytes


def _embedding_bag(tokens, lengths, embedding, keys, query):
    weights = attention_scores(tokens, lengths, keys, query)
    return F.embedding_bag(tokens, embedding, per_sample_weights=weights, mode="sum")


def _eager(tokens, lengths, embedding, keys, query):
    return reference(tokens, lengths, embedding, keys, query)[0]


def run_attention(rounds: int = 5, repeats: int = 10) -> tuple[list[dict], float]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (B, L), generator=gen)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=gen)
    tables = [(torch.randn(shape, generator=gen) * 0.1).requires_grad_()
              for shape in ((V, D), (V, DK), (DK,))]
    grad = torch.randn(B, D, generator=gen)

    def fwd_bwd(fn):
        def step():
            return torch.autograd.grad(fn(tokens, lengths, *tables), tables, grad)
        return step

    variants = {
        "eager (gather, softmax, einsum)": fwd_bwd(_eager),
        "eager + F.embedding_bag": fwd_bwd(_embedding_bag),
        "torch.compile(reference)": fwd_bwd(torch.compile(_eager)),
        "cpu kernel": fwd_bwd(lambda *a: attention_pool(*a, backend="cpu")),
    }
    for fn in variants.values():  # compile, load the extension, warm the caches
        fn()
    samples = {v: [] for v in variants}
    bandwidths = []
    for _ in range(rounds):
        bandwidths.append(copy_bandwidth(64 * 2**20, repeats=5))
        for v, fn in variants.items():
            samples[v].append(median_time(fn, repeats=repeats, warmup=1))
    seconds = {v: statistics.median(s) for v, s in samples.items()}
    bandwidth = statistics.median(bandwidths)
    floor_bytes = _floor_bytes(lengths)
    eager = seconds["eager (gather, softmax, einsum)"]
    rows = [{"name": NAME, "variant": v, "ms": s * 1e3, "GB/s": floor_bytes / s / 1e9,
             "share_of_floor": floor_bytes / bandwidth / s, "speedup_vs_eager": eager / s}
            for v, s in seconds.items()]
    return rows, bandwidth, floor_bytes


def _classifier_select_rows() -> list[dict]:
    path = Path(__file__).resolve().parent / "bench_classifier_select.py"
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("bench_classifier_select", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run()


def main() -> None:
    # no options; the parser gives --help (symfast bench passes it on) and refuses stray ones
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    rows, bandwidth, floor_bytes = run_attention()
    by = {r["variant"]: r["ms"] for r in rows}
    summary = {"copy_bandwidth_GB/s": bandwidth / 1e9,
               "floor_ms": floor_bytes / bandwidth * 1e3,
               "cpu_vs_eager": by["eager (gather, softmax, einsum)"] / by["cpu kernel"],
               "cpu_vs_embedding_bag": by["eager + F.embedding_bag"] / by["cpu kernel"],
               "cpu_vs_compile": by["torch.compile(reference)"] / by["cpu kernel"],
               "targets": {"cpu_vs_eager": 3.0, "cpu_vs_embedding_bag": 2.0, "cpu_vs_compile": 1.2}}
    select_rows = _classifier_select_rows()
    all_rows = rows + select_rows
    print(f"B={B}, L={L}, V={V}, d={D}, d_k={DK}; {torch.get_num_threads()} threads")
    print_table(all_rows, ["name", "variant", "ms", "GB/s", "GFLOP/s", "share_of_floor",
                           "share_of_gemm_floor", "speedup_vs_eager"])
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()})
    path = write_results("attention", {
        "shape": {"B": B, "L": L, "V": V, "d": D, "d_k": DK}, "rows": all_rows,
        "attention_pool_summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
