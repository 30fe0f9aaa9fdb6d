"""Training throughput on the CPU: symfast's networks, the paper-style weight-tied baseline, the
training loop's own overhead, and 2-process DDP scaling.

    python benchmarks/bench_train.py             # writes results/train.json and results/train.png
    python benchmarks/bench_train.py --quick     # fewer repeats and steps
    python benchmarks/bench_train.py --only step,overhead,ddp

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
3. DDP: `torchrun --nproc_per_node 2` (gloo, 1 thread each) against 1 process with 1 thread, the
   same global batch; images/s from metrics.csv after the first log interval. Target: >= 80%
   scaling efficiency.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, median_time, paired_ratio, print_table, write_results  # noqa: E402

from symfast import Denoiser  # noqa: E402
from symfast.data.images import digits  # noqa: E402
from symfast.nn import EquivariantUNet, UNet  # noqa: E402
from symfast.nn.unet import PointwiseConv2d  # noqa: E402
from symfast.train import TrainConfig, make_config  # noqa: E402
from symfast.train.distributed import setup  # noqa: E402
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


def _interval_seconds(run_dir: Path, batch: int) -> list[float]:
    """Seconds per step of each logged interval after the first (which holds the warm-up)."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [batch / float(r["images_per_s"]) for r in rows[1:]]


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


def _cli_command(out: Path, nproc: int, steps: int, size: int, batch: int) -> list[str]:
    args = ["-m", "symfast", "train", "--data", "digits", "--image-size", str(size), "--channels",
            ",".join(map(str, CHANNELS)), "--equivariance", "wt", "--batch-size", str(batch),
            "--steps", str(steps), "--log-every", "5", "--checkpoint-every", "1000",
            "--no-progress", "--out", str(out)]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *args]


def _images_per_s(out: Path, batch: int) -> float:
    """images/s of a finished run after its first log interval."""
    return batch / statistics.fmean(_interval_seconds(out, batch))


def bench_ddp(rounds: int, steps: int) -> dict:
    """1 process x 1 thread (global batch 64) vs torchrun 2 x 1 thread (32 per rank); and, as the
    machine's own limit for 2 processes, two independent 1-thread runs of batch 32 at once (no
    communication at all): their summed images/s over twice the 1-process rate."""
    size = 16
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one, two, pair = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            base = Path(tmp) / str(r)
            subprocess.run(_cli_command(base / "one", 1, steps, size, BATCH), env=env, check=True,
                           capture_output=True)
            one.append(_images_per_s(base / "one", BATCH))
            subprocess.run(_cli_command(base / "two", 2, steps, size, BATCH), env=env, check=True,
                           capture_output=True)
            two.append(_images_per_s(base / "two", BATCH))
            procs = [subprocess.Popen(_cli_command(base / f"half{i}", 1, steps, size, BATCH // 2),
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for i in range(2)]
            for p in procs:
                if p.wait() != 0:
                    raise RuntimeError("an independent half-batch run failed")
            pair.append(sum(_images_per_s(base / f"half{i}", BATCH // 2) for i in range(2)))
    eff = [b / (2 * a) for a, b in zip(one, two)]
    limit = [b / (2 * a) for a, b in zip(one, pair)]
    return {"size": size, "model": "wt", "global_batch": BATCH, "steps": steps,
            "images_per_s_1proc": one, "images_per_s_2proc": two,
            "images_per_s_2_independent": pair,
            "efficiency": statistics.median(eff), "efficiency_per_round": eff,
            "machine_limit": statistics.median(limit), "machine_limit_per_round": limit}


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
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="step,overhead,ddp")
    args = parser.parse_args()
    parts = set(args.only.split(","))
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
        ddp = bench_ddp(rounds=1 if args.quick else 3, steps=20 if args.quick else 40)
        print(f"\nDDP, 2 processes x 1 thread vs 1 process x 1 thread: {100 * ddp['efficiency']:.0f}% "
              f"scaling efficiency (per round {[f'{100 * e:.0f}%' for e in ddp['efficiency_per_round']]}); "
              f"two independent half-batch runs at once reach {100 * ddp['machine_limit']:.0f}% "
              f"(per round {[f'{100 * e:.0f}%' for e in ddp['machine_limit_per_round']]})")
        payload["ddp"] = ddp
    print(f"\nwrote {write_results('train', payload)}")


if __name__ == "__main__":
    main()
