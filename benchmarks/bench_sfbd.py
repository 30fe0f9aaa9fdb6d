"""SFBD's backward step on the CPU: noisy images denoised per second by the PF-ODE from σ = τ.

    python benchmarks/bench_sfbd.py            # writes results/sfbd.json and results/sfbd.png
    python benchmarks/bench_sfbd.py --quick    # fewer repeats
    python benchmarks/bench_sfbd.py --only loop   # some parts: results/sfbd.only-loop.json

1. Throughput (batch 32 noisy digits, τ = 0.5, Heun with S_churn = 0 on the 40-step ρ = 7 EDM grid
   cut at τ, channels 32,64,64) at 16x16 and 32x32 for the plain UNet, EquivariantUNet (WT, D4)
   and the plain UNet frame-averaged over D4 (FA: 8 network calls per evaluation):
   - "fused": symfast.denoise (the sampler core with the fused step op), as SFBD runs it;
   - "eager": the same ODE written as the official code writes it (EDM's edm_sampler loop:
     float64 state, t_hat/x_hat/d_cur/d_prime in eager torch ops), with the same network and
     preconditioning, so the two differ only in the loop.
   Targets: fused >= eager with the same network (paired ratio); WT >= 6x FA (fused medians of
   the same run).
   The network is >99% of either path, so the paired ratio is 1 within the machine's run-to-run
   spread (0.90-1.07 between runs here); what the two paths do differently is measured apart:
   "loop": both paths with a network that costs nothing (x * 0.5), same grid and batch: the
   time of the loop alone, and the network calls each makes (equal: the same evaluations).
2. 2-process scaling: under torchrun, 2 processes x 1 thread each denoising their shards of 128
   images (symfast.train.sfbd.denoise_into_shards, shard files written) against rank 0 alone
   denoising all 128 with 1 thread, phases alternated in one job. Target: >= 85% efficiency.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, print_table, run_two_process_worker, write_results  # noqa: E402

from symfast import Denoiser, denoise  # noqa: E402
from symfast._io import atomic_path  # noqa: E402
from symfast.data import NoisyDataset, digits  # noqa: E402
from symfast.groups import get  # noqa: E402
from symfast.nn import EquivariantUNet, UNet  # noqa: E402
from symfast.samplers.api import denoise_sigmas  # noqa: E402

CHANNELS = (32, 64, 64)
BATCH = 32
TAU = 0.5
STEPS = 40


def denoisers(size: int) -> dict[str, Denoiser]:
    torch.manual_seed(0)
    d4 = get("d4")
    plain = UNet(1, 1, CHANNELS).eval().requires_grad_(False)
    tied = EquivariantUNet(1, 1, CHANNELS, "d4").eval().requires_grad_(False)
    return {"unet": Denoiser(plain, "edm"),
            "wt": Denoiser(tied, "edm"),  # declared equivariant: one call per evaluation
            "fa": Denoiser(plain, "edm", group=d4, frame_average=True)}


def edm_loop(denoiser: Denoiser, y: torch.Tensor, tau: float, steps: int) -> torch.Tensor:
    """EDM's edm_sampler (S_churn = 0) as SFBD's code calls it: the grid cut at τ with τ first,
    float64 state, the network called on float32 input."""
    t_steps = torch.as_tensor(denoise_sigmas(denoiser, tau, "heun", steps), dtype=torch.float64)
    x_next = y.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = x_next, t_cur
        denoised = denoiser(x_hat.float(), float(t_hat)).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if t_next > 0:
            denoised = denoiser(x_next.float(), float(t_next)).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.float()


class _Free(torch.nn.Module):
    """A network that costs nothing and counts its calls: what is left of a path is its loop."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 0.5


def bench_loop(size: int, repeats: int) -> dict:
    """Both paths' own time (the network's removed) and their network calls, medians of paired
    runs."""
    y = noisy_batch(size)
    net = _Free()
    d = Denoiser(net, "edm")
    paths = {"fused": lambda: denoise(d, y, TAU, steps=STEPS), "eager": lambda: edm_loop(d, y, TAU, STEPS)}
    calls = {}
    with torch.no_grad():
        for name, fn in paths.items():
            net.calls = 0
            fn()
            calls[name] = net.calls
        t_eager, t_fused, ratio = paired_times(paths["eager"], paths["fused"], repeats)
    return {"size": size, "fused_loop_ms": 1e3 * t_fused, "eager_loop_ms": 1e3 * t_eager,
            "eager_vs_fused_loop_paired": ratio, "fused_network_calls": calls["fused"],
            "eager_network_calls": calls["eager"]}


def noisy_batch(size: int, n: int = BATCH) -> torch.Tensor:
    return NoisyDataset(digits(size), TAU, seed=0).get_batch(torch.arange(n))


def paired_times(base, fn, repeats: int) -> tuple[float, float, float]:
    """Medians of t(base) and t(fn) and of t(base)/t(fn), the two timed back to back each
    repeat, in alternating order (whichever runs second was measured up to 10% slower here);
    the caller has called each once: the warm-up."""
    tb, tf = [], []
    for i in range(repeats):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            (base, fn)[which]()
            (tb, tf)[which].append(time.perf_counter() - t0)
    return statistics.median(tb), statistics.median(tf), statistics.median(b / f for b, f in zip(tb, tf))


def bench_throughput(sizes, repeats: int) -> list[dict]:
    rows = []
    with torch.no_grad():
        for size in sizes:
            y = noisy_batch(size)
            models = denoisers(size)
            fused = {m: (lambda d=d: denoise(d, y, TAU, steps=STEPS)) for m, d in models.items()}
            eager = {m: (lambda d=d: edm_loop(d, y, TAU, STEPS)) for m, d in models.items()}
            times = {}
            for m in models:
                diff = float((fused[m]() - eager[m]()).abs().max())
                # FA makes 8 network calls per evaluation (~20 s per call at 32x32 here): one pair
                reps = 2 if m == "fa" else repeats
                t_eager, t_fused, ratio = paired_times(eager[m], fused[m], reps)
                times[m] = t_fused
                print(f"  {size}x{size} {m}: fused {t_fused:.2f} s, eager {t_eager:.2f} s", flush=True)
                rows.append({"size": size, "model": m, "fused_img_per_s": BATCH / t_fused,
                             "eager_img_per_s": BATCH / t_eager, "fused_vs_eager_paired": ratio,
                             "max_abs_diff_fused_eager": diff})
            for r in rows[-3:]:
                r["wt_vs_fa"] = times["fa"] / times["wt"] if r["model"] == "wt" else None
    return rows


def scaling_worker(rounds: int, n: int, out: str) -> None:
    """Under torchrun, 2 processes of 1 thread: "two" (each rank its shards of n images) and
    "solo" (rank 0 all n; rank 1 waits at the barrier), alternated ``rounds`` times."""
    import torch.distributed as dist

    from symfast.train.distributed import World, setup
    from symfast.train.sfbd import denoise_into_shards

    world = setup()
    noisy = NoisyDataset(digits(16), TAU, seed=0)
    model = denoisers(16)["wt"]
    positions = torch.arange(n)
    times = {"two": [], "solo": []}
    tmp = Path(out).parent  # the parent's temporary folder: the same on both ranks
    with torch.no_grad():
        for i in range(rounds + 1):  # the first round warms up
            for phase in ("two", "solo"):
                folder = Path(tmp) / f"{phase}-{i}-{world.rank}"
                dist.barrier()
                t0 = time.perf_counter()
                if phase == "two":
                    denoise_into_shards(model, noisy, positions, Path(tmp) / f"two-{i}", world,
                                        steps=STEPS, sampler="heun", batch=32, shard_size=32)
                elif world.is_main:
                    denoise_into_shards(model, noisy, positions, folder, World(), steps=STEPS,
                                        sampler="heun", batch=32, shard_size=32)
                dist.barrier()
                if i:
                    times[phase].append(time.perf_counter() - t0)
    if world.is_main:
        Path(out).write_text(json.dumps(times))
    world.close()


def bench_scaling(rounds: int, n: int = 128) -> dict:
    times = run_two_process_worker(__file__, "--scaling-worker", rounds, n)
    eff = [s / (2 * t) for s, t in zip(times["solo"], times["two"])]
    return {"size": 16, "model": "wt", "images": n, "rounds": rounds,
            "img_per_s_1proc": [n / t for t in times["solo"]],
            "img_per_s_2proc": [n / t for t in times["two"]],
            "efficiency": statistics.median(eff), "efficiency_per_round": eff}


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.2))
    for ax, size in zip(np.atleast_1d(axes), sizes):
        sub = [r for r in rows if r["size"] == size]
        xs = np.arange(len(sub))
        ax.bar(xs - 0.2, [r["fused_img_per_s"] for r in sub], 0.4, label="symfast.denoise (fused)")
        ax.bar(xs + 0.2, [r["eager_img_per_s"] for r in sub], 0.4, label="EDM loop (eager)")
        ax.set_xticks(xs)
        ax.set_xticklabels([r["model"] for r in sub])
        ax.set_yscale("log")
        ax.set_title(f"{size}x{size}, batch {BATCH}")
        ax.set_ylabel("noisy images denoised / s")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle(f"SFBD backward step, PF-ODE from tau={TAU} ({torch.get_num_threads()} threads)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


PARTS = ('throughput', 'loop', 'scaling')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--scaling-worker", nargs=3, metavar=("ROUNDS", "N", "OUT"),
                        help=argparse.SUPPRESS)  # the torchrun side of the scaling benchmark
    args = parser.parse_args()
    if args.scaling_worker:
        rounds, n, out = args.scaling_worker
        scaling_worker(int(rounds), int(n), out)
        return
    parts = set(args.only.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--only takes parts of {','.join(PARTS)}; got {args.only!r}")
    payload = {}
    if "throughput" in parts:
        rows = bench_throughput((16, 32), repeats=3 if args.quick else 7)
        print(f"SFBD backward step: PF-ODE from tau={TAU}, {STEPS}-step grid, batch {BATCH}, "
              f"channels {CHANNELS} ({torch.get_num_threads()} threads)")
        print_table(rows, ["size", "model", "fused_img_per_s", "eager_img_per_s",
                           "fused_vs_eager_paired", "wt_vs_fa", "max_abs_diff_fused_eager"])
        payload["throughput"] = rows
        png = plot(rows, RESULTS / "sfbd.png")
        if png:
            print(f"wrote {png}")
    if "loop" in parts:
        loops = [bench_loop(size, repeats=11 if args.quick else 31) for size in (16, 32)]
        print("\nThe loops alone (a network that costs nothing), batch 32:")
        print_table(loops, ["size", "fused_loop_ms", "eager_loop_ms", "eager_vs_fused_loop_paired",
                            "fused_network_calls", "eager_network_calls"])
        payload["loop"] = loops
    if "scaling" in parts:
        sc = bench_scaling(rounds=3 if args.quick else 7)
        print(f"\n2 processes x 1 thread vs 1 process x 1 thread (WT 16x16, {sc['images']} images): "
              f"{100 * sc['efficiency']:.0f}% scaling efficiency (median; per round "
              f"{', '.join(f'{100 * e:.0f}%' for e in sc['efficiency_per_round'])})")
        payload["scaling"] = sc
    print(f"\nwrote {write_results('sfbd', payload, parts, set(PARTS))}")


if __name__ == "__main__":
    main()
