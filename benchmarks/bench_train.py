"""Training throughput on the CPU: symfast's networks, the paper-style weight-tied baseline, the
training loop's own overhead, and 2-process DDP scaling.

    python benchmarks/bench_train.py             # writes results/train.json and results/train.png
    python benchmarks/bench_train.py --quick     # fewer repeats and steps
    python benchmarks/bench_train.py --only ddp  # some parts: results/train.only-ddp.json

1. Per training step (batch 64, digits at 16x16 and 32x32, channels 32,64,64, EDM loss, the
   fused AdamW of symfast's loop, gradient clipping; the same batch every step), in a bare loop,
   every model with the same loss and optimiser code:
   - "unet": symfast's plain UNet;
   - "wt": EquivariantUNet (D4 tied convolutions, symfast's CPU kernels);
   - "wt (parametrize)": the same D4 weight-tied architecture written as the paper's code writes
     it: nn.Conv2d layers (1x1 ones included) whose 3x3 kernels are symmetrised through
     torch.nn.utils.parametrize (weight = the mean of the kernel over the 8 D4 elements).
   Target: wt >= 2x "wt (parametrize)" per step, as the median of back-to-back step pairs.
2. The loop's overhead: an iteration of symfast.train's loop (EMA, counter-based randomness,
   metrics, a log row every 10 steps, a checkpoint every 50, amortised) against a bare
   forward/backward/step of an identical network drawing its batch and noise with torch, the
   two alternated step by step. Target: <= 5% of a step.
3. DDP: 2 processes (gloo, 1 thread each, 32 images per rank) against 1 process with 1 thread
   (batch 64), symfast's loop in both, WT at 16x16 and 32x32, alternated phase by phase in one
   torchrun job, beside the limit for two processes in lock step (no communication), and that
   limit's two factors: a batch-32 step against half a batch-64 step in one process (the per-step
   cost that does not shrink with the batch), and the slowdown of a batch-32 step while the other
   process runs one too. Target: >= 80% scaling efficiency.
4. Why that limit: copy bandwidth of one process alone against two processes copying at once
   (1 thread each), for working sets from 4 to 64 MB (source + destination) around the L3 size,
   phases alternated in one torchrun job. Working sets that fit the shared L3 alone but not twice
   over run at memory speed when both processes work.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RESULTS, median_time, paired_ratio, print_table,  # noqa: E402
                     run_two_process_worker, write_results)  # noqa: E402

from symfast import Denoiser  # noqa: E402
from symfast._io import atomic_path  # noqa: E402
from symfast.data.images import digits  # noqa: E402
from symfast.nn import EquivariantUNet, UNet  # noqa: E402
from symfast.nn.unet import PointwiseConv2d  # noqa: E402
from symfast.train import TrainConfig, make_config  # noqa: E402
from symfast.train.distributed import World, setup  # noqa: E402
from symfast.train.loop import _Run, make_optimizer  # noqa: E402

CHANNELS = (32, 64, 64)
BATCH = 64


class D4Symmetric(nn.Module):
    """A parametrization: the kernel's mean over the 8 elements of D4 (a D4-invariant kernel)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        total = 0
        for k in range(4):
            r = torch.rot90(w, k, (-2, -1))
            total = total + r + r.flip(-1)
        return total / 8


def paper_style_wt(channels=CHANNELS) -> nn.Module:
    """The UNet architecture in plain PyTorch layers with parametrize-tied 3x3 kernels
    (backend="reference": F.group_norm + F.silu, not symfast's fused op)."""
    net = UNet(1, 1, channels, backend="reference")
    for name, module in list(net.named_modules()):
        if isinstance(module, PointwiseConv2d):
            plain = nn.Conv2d(module.in_channels, module.out_channels, 1)
            parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            setattr(parent, name.rsplit(".", 1)[-1], plain)
    for module in net.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            parametrize.register_parametrization(module, "weight", D4Symmetric())
    return net


def bare_step(net: nn.Module, data: torch.Tensor, fresh_draws: bool = False, seed: int = 0):
    """One training step of ``net``: EDM loss, backward, clip, AdamW. The batch, σ and noise are
    drawn once (the first BATCH images), or every step as a hand-written loop draws them
    (``fresh_draws``: a random batch of ``data``, torch.rand σ quantiles, torch.randn noise)."""
    denoiser = Denoiser(net, "edm", frame_average=False)
    opt = make_optimizer(net.parameters(), TrainConfig(lr=1e-4))
    gen = torch.Generator().manual_seed(seed)

    def draws():
        x0 = data[torch.randint(len(data), (BATCH,), generator=gen)] if fresh_draws else data[:BATCH]
        sigma, t = denoiser.schedule.training_levels(torch.rand(BATCH, generator=gen, dtype=torch.float64))
        return x0, sigma, t, torch.randn(x0.shape, generator=gen)

    fixed = draws()

    def step():
        x0, sigma, t, noise = draws() if fresh_draws else fixed
        opt.zero_grad(set_to_none=True)
        loss = denoiser.loss(x0, sigma, noise, t=t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        opt.step()
    return step


def bench_steps(sizes, repeats: int) -> list[dict]:
    rows = []
    for size in sizes:
        data = digits(size).images
        torch.manual_seed(0)
        nets = {"unet": UNet(1, 1, CHANNELS), "wt": EquivariantUNet(1, 1, CHANNELS, "d4"),
                "wt (parametrize)": paper_style_wt()}
        steps = {name: bare_step(net, data) for name, net in nets.items()}
        times = {name: median_time(fn, repeats, warmup=2) for name, fn in steps.items()}
        ratio = paired_ratio(steps["wt (parametrize)"], steps["wt"], repeats)
        for name, net in nets.items():
            rows.append({"size": size, "model": name, "params": sum(p.numel() for p in net.parameters()),
                         "ms_per_step": times[name] * 1e3, "images_per_s": BATCH / times[name],
                         "wt_speedup_paired": ratio if name == "wt (parametrize)" else None})
    return rows


def bench_overhead(pairs: int) -> dict:
    """symfast's loop iteration (its train step plus EMA, counter-based draws, metrics, a log row
    every 10 steps and a checkpoint every 50) against a bare step of an identical network, the
    two alternated step by step so both see the same machine load; the overhead is the ratio
    of their summed times (checkpoints and log rows amortised)."""
    size, log_every, ckpt_every = 16, 10, 50
    data = digits(size).images
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(data="digits", image_size=size, channels=CHANNELS, equivariance="wt",
                          batch_size=BATCH, steps=10**6, log_every=log_every,
                          checkpoint_every=ckpt_every, progress=False, out=tmp)
        run = _Run(cfg, setup(), None, None)
        run.open_outputs()
        torch.manual_seed(0)
        bare = bare_step(EquivariantUNet(1, 1, CHANNELS, "d4"), data, fresh_draws=True)
        for _ in range(3):
            run.iteration()
            bare()
        loop_t, bare_t = [], []
        for _ in range(pairs):
            t0 = time.perf_counter()
            run.iteration()
            t1 = time.perf_counter()
            bare()
            loop_t.append(t1 - t0)
            bare_t.append(time.perf_counter() - t1)
        run.close_outputs()
    return {"size": size, "model": "wt", "pairs": pairs, "checkpoint_every": ckpt_every,
            "log_every": log_every, "loop_ms_per_step": 1e3 * sum(loop_t) / pairs,
            "bare_ms_per_step": 1e3 * sum(bare_t) / pairs,
            "overhead": sum(loop_t) / sum(bare_t) - 1.0,
            "median_pair_ratio": statistics.median(a / b for a, b in zip(loop_t, bare_t))}


DDP_PHASES = ("ddp", "solo", "solo_half", "lockstep")


def ddp_worker(pairs: int, steps: int, size: int, out: str) -> None:
    """Run under torchrun with 2 processes of 1 thread, WT at ``size`` x ``size``. Alternates,
    `pairs` times, `steps` iterations of each phase, so that every ratio compares phases seconds
    apart (separate runs minutes apart swung 51-101% on this shared machine):
    - "ddp": symfast's loop under DDP, 32 images per rank (global batch 64);
    - "solo": symfast's loop on rank 0 alone, batch 64 (rank 1 waits at a barrier);
    - "solo_half": the same, batch 32: solo / (2 solo_half) is what the per-step cost that does
      not shrink with the batch leaves of perfect scaling;
    - "lockstep": each rank its own loop of batch 32 with no gradient communication at all,
      ranks held together by a barrier per step: the limit for two processes working in step
      (lockstep / solo_half: what each loses to the other on the shared caches and memory, and
      to waiting for the slower one at every step).
    Rank 0 writes the per-step times to `out` (JSON)."""
    import json

    import torch.distributed as dist

    world = setup()
    with tempfile.TemporaryDirectory() as tmp:
        base = dict(data="digits", image_size=size, channels=CHANNELS, equivariance="wt",
                    batch_size=BATCH, steps=10**6, log_every=10**6, checkpoint_every=10**6,
                    progress=False)
        runs = {"ddp": _Run(make_config(base, out=f"{tmp}/ddp"), world, None, None),
                "lockstep": _Run(make_config(base, batch_size=BATCH // 2, out=f"{tmp}/lock{world.rank}"),
                                 World(), None, None)}
        if world.is_main:
            runs["solo"] = _Run(make_config(base, out=f"{tmp}/solo"), World(), None, None)
            runs["solo_half"] = _Run(make_config(base, batch_size=BATCH // 2, out=f"{tmp}/half"),
                                     World(), None, None)
        for run in runs.values():
            run.open_outputs()
        times = {phase: [] for phase in DDP_PHASES}
        for i in range(pairs + 1):  # the first round warms up
            for phase in DDP_PHASES:
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(steps):
                    if phase in runs:
                        runs[phase].iteration()
                    if phase == "lockstep":
                        dist.barrier()
                dist.barrier()
                if i:
                    times[phase].append((time.perf_counter() - t0) / steps)
        if world.is_main:
            Path(out).write_text(json.dumps(times))
    world.close()


CACHE_WORKING_SETS_MB = (4, 8, 16, 32, 64)


def shared_cache_worker(rounds: int, unused: str, out: str) -> None:
    """Under torchrun, 2 processes of 1 thread: per working set, "solo" (rank 0 copies, rank 1
    waits at the barrier) and "pair" (both copy at once), alternated ``rounds`` times; rank 0
    writes its GB/s (bytes read + written per second) per phase to ``out``."""
    import json

    import torch.distributed as dist

    from symfast.profiling.timing import copy_bandwidth

    world = setup()
    rates = {mb: {"solo": [], "pair": []} for mb in CACHE_WORKING_SETS_MB}
    for _ in range(rounds):
        for mb in CACHE_WORKING_SETS_MB:
            for phase in ("solo", "pair"):
                dist.barrier()
                if phase == "pair" or world.is_main:
                    # half the working set is the source, half the destination
                    rate = copy_bandwidth(mb * 2**19, repeats=max(5, 640 // mb))
                    rates[mb][phase].append(rate / 1e9)
                dist.barrier()
    if world.is_main:
        Path(out).write_text(json.dumps(rates))
    world.close()


def bench_shared_cache(rounds: int) -> list[dict]:
    rates = run_two_process_worker(__file__, "--cache-worker", rounds, "-")
    return [{"working_set_mb": int(mb), "solo_GB/s": statistics.median(r["solo"]),
             "each_of_two_GB/s": statistics.median(r["pair"]),
             "two_vs_solo": statistics.median(r["pair"]) / statistics.median(r["solo"])}
            for mb, r in rates.items()]


def bench_ddp(pairs: int, steps: int, size: int) -> dict:
    """2-process DDP (gloo, 1 thread each) against 1 process with 1 thread, same global batch,
    the lock-step limit and its two factors, alternated inside one torchrun job (ddp_worker)."""
    times = run_two_process_worker(__file__, "--ddp-worker", pairs, steps, size)
    solo, half = times["solo"], times["solo_half"]
    eff = [s / (2 * d) for s, d in zip(solo, times["ddp"])]
    limit = [s / (2 * d) for s, d in zip(solo, times["lockstep"])]
    return {"size": size, "model": "wt", "global_batch": BATCH, "rounds": pairs,
            "steps_per_phase": steps,
            "ms_per_step_1proc": [1e3 * t for t in solo],
            "ms_per_step_1proc_batch32": [1e3 * t for t in half],
            "ms_per_step_2proc": [1e3 * t for t in times["ddp"]],
            "ms_per_step_lockstep": [1e3 * t for t in times["lockstep"]],
            "efficiency": statistics.median(eff), "efficiency_per_round": eff,
            "lockstep_limit": statistics.median(limit), "lockstep_limit_per_round": limit,
            "share_of_limit": statistics.median(e / lim for e, lim in zip(eff, limit)),
            "batch_limit": statistics.median(s / (2 * h) for s, h in zip(solo, half)),
            "pair_slowdown": statistics.median(
                lock / h for lock, h in zip(times["lockstep"], half))}


def plot(rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sizes = sorted({r["size"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [next(r["images_per_s"] for r in rows if r["size"] == s and r["model"] == m) for s in sizes]
        ax.bar([j + i * width for j in range(len(sizes))], vals, width, label=m)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(sizes))])
    ax.set_xticklabels([f"{s}x{s}" for s in sizes])
    ax.set_ylabel("training images / s")
    ax.set_title(f"CPU training step, batch {BATCH} ({torch.get_num_threads()} threads)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


PARTS = ('step', 'overhead', 'ddp', 'cache')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(PARTS))
    parser.add_argument("--ddp-worker", nargs=4, metavar=("PAIRS", "STEPS", "SIZE", "OUT"),
                        help=argparse.SUPPRESS)  # the torchrun side of the DDP benchmark
    parser.add_argument("--cache-worker", nargs=3, metavar=("ROUNDS", "UNUSED", "OUT"),
                        help=argparse.SUPPRESS)  # the torchrun side of the shared-cache measurement
    args = parser.parse_args()
    if args.cache_worker:
        rounds, unused, out = args.cache_worker
        shared_cache_worker(int(rounds), unused, out)
        return
    if args.ddp_worker:
        pairs, steps, size, out = args.ddp_worker
        ddp_worker(int(pairs), int(steps), int(size), out)
        return
    parts = set(args.only.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--only takes parts of {','.join(PARTS)}; got {args.only!r}")
    payload = {}
    if "step" in parts:
        rows = bench_steps((16, 32), repeats=5 if args.quick else 15)
        print(f"Training step, batch {BATCH}, channels {CHANNELS} ({torch.get_num_threads()} threads)")
        print_table(rows, ["size", "model", "params", "ms_per_step", "images_per_s", "wt_speedup_paired"])
        payload["step"] = rows
        png = plot(rows, RESULTS / "train.png")
        if png:
            print(f"wrote {png}")
    if "overhead" in parts:
        over = bench_overhead(pairs=30 if args.quick else 150)
        print(f"\nLoop overhead (symfast's iteration vs a bare step, WT 16x16, alternated): "
              f"{100 * over['overhead']:.1f}% of a step ({over['loop_ms_per_step']:.1f} vs "
              f"{over['bare_ms_per_step']:.1f} ms; median pair ratio {over['median_pair_ratio']:.3f})")
        payload["overhead"] = over
    if "ddp" in parts:
        payload["ddp"] = []
        for size in (16, 32):
            ddp = bench_ddp(pairs=3 if args.quick else 8, steps=5 if args.quick else 10, size=size)
            print(f"\nDDP, WT {size}x{size}, 2 processes x 1 thread vs 1 process x 1 thread, "
                  f"alternated phases: {100 * ddp['efficiency']:.0f}% scaling efficiency (median; "
                  f"per round {', '.join(f'{100 * e:.0f}%' for e in ddp['efficiency_per_round'])}). "
                  f"Two processes in lock step with no communication reach "
                  f"{100 * ddp['lockstep_limit']:.0f}% (per round "
                  f"{', '.join(f'{100 * e:.0f}%' for e in ddp['lockstep_limit_per_round'])}); "
                  f"DDP is at {100 * ddp['share_of_limit']:.0f}% of that limit. The limit's factors: "
                  f"a batch-32 step costs {1 / (2 * ddp['batch_limit']):.2f} of a batch-64 step in "
                  f"one process ({100 * ddp['batch_limit']:.0f}% scaling at most), and runs "
                  f"{ddp['pair_slowdown']:.2f}x as long beside the other process's")
            payload["ddp"].append(ddp)
    if "cache" in parts:
        cache = bench_shared_cache(rounds=3 if args.quick else 5)
        print("\nCopy bandwidth, one process alone vs each of two copying at once (1 thread each):")
        print_table(cache, ["working_set_mb", "solo_GB/s", "each_of_two_GB/s", "two_vs_solo"])
        payload["shared_cache"] = cache
    print(f"\nwrote {write_results('train', payload, parts, set(PARTS))}")


if __name__ == "__main__":
    main()
