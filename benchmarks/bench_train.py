"""Training throughput on the CPU: symfast's networks, the paper-style weight-tied baseline, the
training loop's own overhead, and 2-process DDP scaling.

    python benchmarks/bench_train.py             # writes results/train.json and results/train.png
    python benchmarks/bench_train.py --quick     # fewer repeats and steps
    python benchmarks/bench_train.py --only step,overhead,ddp

1. Per training step (batch 64, digits at 16x16 and 32x32, channels 32,64,64, EDM loss, AdamW,
   gradient clipping; the same batch every step), in a bare loop:
   - "unet": symfast's plain UNet;
   - "wt": EquivariantUNet (D4 tied convolutions, symfast's CPU kernels);
   - "wt (parametrize)": the same D4 weight-tied architecture written as the paper's code writes
     it: nn.Conv2d layers (1x1 ones included) whose 3x3 kernels are symmetrised through
     torch.nn.utils.parametrize (weight = the mean of the kernel over the 8 D4 elements).
   Target: wt >= 2x "wt (parametrize)" per step, as the median of back-to-back step pairs.
2. The loop's overhead: symfast.train.train (EMA, counter-based randomness, metrics, a checkpoint
   every 50 steps, all amortised) against a bare forward/backward/step loop of the same network,
   data and loss, per step. Target: <= 5% of a step.
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
from symfast.train import train  # noqa: E402

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
    """The UNet architecture in plain PyTorch layers with parametrize-tied 3x3 kernels."""
    net = UNet(1, 1, channels)
    for name, module in list(net.named_modules()):
        if isinstance(module, PointwiseConv2d):
            plain = nn.Conv2d(module.in_channels, module.out_channels, 1)
            parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            setattr(parent, name.rsplit(".", 1)[-1], plain)
    for module in net.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            parametrize.register_parametrization(module, "weight", D4Symmetric())
    return net


def bare_step(net: nn.Module, x0: torch.Tensor, seed: int = 0):
    """One training step of ``net`` on the fixed batch x0: EDM loss, backward, clip, AdamW."""
    denoiser = Denoiser(net, "edm", frame_average=False)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(seed)
    sigma, t = denoiser.schedule.training_levels(torch.rand(x0.shape[0], generator=gen, dtype=torch.float64))
    noise = torch.randn(x0.shape, generator=gen)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = denoiser.loss(x0, sigma, noise, t=t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        opt.step()
    return step


def bench_steps(sizes, repeats: int) -> list[dict]:
    rows = []
    for size in sizes:
        x0 = digits(size).images[:BATCH].contiguous()
        torch.manual_seed(0)
        nets = {"unet": UNet(1, 1, CHANNELS), "wt": EquivariantUNet(1, 1, CHANNELS, "d4"),
                "wt (parametrize)": paper_style_wt()}
        steps = {name: bare_step(net, x0) for name, net in nets.items()}
        times = {name: median_time(fn, repeats, warmup=2) for name, fn in steps.items()}
        ratio = paired_ratio(steps["wt (parametrize)"], steps["wt"], repeats)
        for name, net in nets.items():
            rows.append({"size": size, "model": name, "params": sum(p.numel() for p in net.parameters()),
                         "ms_per_step": times[name] * 1e3, "images_per_s": BATCH / times[name],
                         "wt_speedup_paired": ratio if name == "wt (parametrize)" else None})
    return rows


def _interval_seconds(run_dir: Path, batch: int, log_every: int) -> list[float]:
    """Seconds per step of each logged interval after the first (which holds the warm-up)."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [batch / float(r["images_per_s"]) for r in rows[1:]]


def bench_overhead(rounds: int, steps: int) -> dict:
    """train() vs the bare loop, alternated; the per-round ratio of mean step times."""
    size, log_every, ckpt_every = 16, 10, 50
    x0 = digits(size).images[:BATCH].contiguous()
    ratios, loop_ms, bare_ms = [], [], []
    for r in range(rounds):
        torch.manual_seed(0)
        step = bare_step(EquivariantUNet(1, 1, CHANNELS, "d4"), x0)
        for _ in range(3):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        bare = (time.perf_counter() - start) / steps
        with tempfile.TemporaryDirectory() as tmp:
            train(data="digits", image_size=size, channels=CHANNELS, equivariance="wt",
                  batch_size=BATCH, steps=steps + log_every, log_every=log_every,
                  checkpoint_every=ckpt_every, progress=False, out=tmp)
            loop = statistics.fmean(_interval_seconds(Path(tmp), BATCH, log_every))
        ratios.append(loop / bare)
        loop_ms.append(loop * 1e3)
        bare_ms.append(bare * 1e3)
    return {"size": size, "model": "wt", "steps": steps, "checkpoint_every": ckpt_every,
            "log_every": log_every, "loop_ms_per_step": loop_ms, "bare_ms_per_step": bare_ms,
            "overhead": statistics.median(ratios) - 1.0, "overhead_per_round": [x - 1 for x in ratios]}


def _run_cli(out: Path, nproc: int, steps: int, size: int) -> float:
    """images/s of a `symfast train` run (1 thread per process) after its first log interval."""
    args = ["-m", "symfast", "train", "--data", "digits", "--image-size", str(size), "--channels",
            ",".join(map(str, CHANNELS)), "--equivariance", "wt", "--batch-size", str(BATCH),
            "--steps", str(steps), "--log-every", "5", "--checkpoint-every", "1000",
            "--no-progress", "--out", str(out)]
    cmd = [sys.executable, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    seconds = _interval_seconds(out, BATCH, 5)
    return BATCH / statistics.fmean(seconds)


def bench_ddp(rounds: int, steps: int) -> dict:
    size = 16
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            one.append(_run_cli(Path(tmp) / f"one{r}", 1, steps, size))
            two.append(_run_cli(Path(tmp) / f"two{r}", 2, steps, size))
    eff = [b / (2 * a) for a, b in zip(one, two)]
    return {"size": size, "model": "wt", "global_batch": BATCH, "steps": steps,
            "images_per_s_1proc": one, "images_per_s_2proc": two,
            "efficiency": statistics.median(eff), "efficiency_per_round": eff}


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
        over = bench_overhead(rounds=2 if args.quick else 5, steps=20 if args.quick else 100)
        print(f"\nLoop overhead (train() vs a bare loop, WT 16x16): {100 * over['overhead']:.1f}% "
              f"of a step (per round: {', '.join(f'{100 * o:.1f}%' for o in over['overhead_per_round'])})")
        payload["overhead"] = over
    if "ddp" in parts:
        ddp = bench_ddp(rounds=1 if args.quick else 3, steps=20 if args.quick else 40)
        print(f"\nDDP, 2 processes x 1 thread vs 1 process x 1 thread: {100 * ddp['efficiency']:.0f}% "
              f"scaling efficiency ({ddp['images_per_s_1proc']} vs {ddp['images_per_s_2proc']} images/s)")
        payload["ddp"] = ddp
    print(f"\nwrote {write_results('train', payload)}")


if __name__ == "__main__":
    main()
