"""SFBD's claim at a size this machine runs: with few clean images and many noisy ones, SFBD's
model is closer to the clean distribution than a model trained on the noisy images only, and
than one trained on the clean images only.

    python experiments/sfbd_gmm.py            # (~1 hour) writes experiments/results/sfbd_gmm.{json,png}
    python experiments/sfbd_gmm.py --quick    # a few seconds (the test runs this)
    python experiments/sfbd_gmm.py --data digits   # the same on digits: sfbd_digits.{json,png}

The data: 4096 images from symfast's D4-invariant Gaussian mixture on 8x8 images (32 components
of std 0.1; gmm-d4), whose exact posterior mean is known, so two exact-or-sampled measures exist
without a feature network:
- posterior MSE: the EMA denoiser's mean squared error against the exact E[x | x + σε], averaged
  over σ in {0.05, 0.1, 0.2, 0.5, 1}, on fresh samples;
- pixel FD: the Fréchet distance in pixel space between 2048 model samples (Heun, 32 steps) and
  2048 fresh mixture samples (beside the FD of two fresh mixture sets: the floor at this n).
Runs, all with the same network (UNet 32,64), batch 64 and total step budget:
- "clean only": the 4% clean images; "noisy only": the noisy images y = x + τε as if clean;
- "SFBD": pretraining on the clean images, then rounds of denoising the noisy ones from τ and
  fine-tuning (symfast.train.sfbd.run), measured after pretraining and after every round.
Each over ``--seeds`` seeds (training seed and data split); the table gives mean and spread.

``--data digits``: 4096 images drawn (fixed) from the training split of the D4-augmented digits
(16x16, symfast.data.digits(16, split="train") under D4); no exact posterior exists, so the
measure is the FD in the shipped digit classifier's feature space (symfast.metrics.frechet_distance)
between n model samples and n clean training images (the floor: two disjoint sets of them).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import save_figure, write_json  # experiments/ is on sys.path
from symfast import sample
from symfast.data import (ImageTensorDataset, NoisyDataset, clean_split, digits, gaussian_mixture,
                          orbit_augmented)
from symfast.metrics import frechet_distance, posterior_mse
from symfast.train import train
from symfast.train.sfbd import run

RESULTS = Path(__file__).resolve().parent / "results"
SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0)

FULL = dict(n_images=4096, clean_fraction=0.04, tau=0.5, pretrain_steps=1000, rounds=3,
            steps_per_round=500, n_eval=2048, sample_steps=32, channels=(32, 64), batch_size=64,
            lr=2e-3, ema_halflife_images=20000)
# digits: fewer, shorter evaluation samplings (16x16 images cost 4x the 8x8 ones)
FULL_DIGITS = dict(FULL, n_eval=1000, sample_steps=18)
QUICK = dict(FULL, n_images=256, pretrain_steps=10, rounds=2, steps_per_round=5, n_eval=64,
             sample_steps=4, channels=(8, 16), batch_size=8, ema_halflife_images=200)


class MixtureTask:
    """The D4 Gaussian mixture on 8x8: exact posterior MSE and pixel FD against fresh samples."""

    size, measures = 8, ("pixel_fd", "posterior_mse")

    def __init__(self, p: dict):
        self.p = p
        self.mixture = gaussian_mixture("d4", size=8, channels=1, seed=0)
        self.data = self.mixture.dataset(p["n_images"], seed=0)

    def evaluate(self, denoiser, seed: int) -> dict[str, float]:
        p = self.p
        errors = posterior_mse(denoiser, self.mixture, SIGMAS, n=p["n_eval"], seed=1000 + seed)
        x = sample(denoiser, (p["n_eval"], 1, 8, 8), sampler="heun", steps=p["sample_steps"],
                   seed=2000 + seed, progress=False)
        return {"posterior_mse": statistics.fmean(errors),
                "pixel_fd": frechet_distance(x, self.mixture.sample(p["n_eval"], seed=3000 + seed),
                                             features="pixels")}

    def floor(self, seed: int) -> float:
        n = self.p["n_eval"]
        return frechet_distance(self.mixture.sample(n, seed=4000 + seed),
                                self.mixture.sample(n, seed=3000 + seed), features="pixels")


class DigitsTask:
    """4096 D4-augmented training digits (16x16): FD in the shipped digit features against clean
    training images."""

    size, measures = 16, ("fd",)

    def __init__(self, p: dict):
        self.p = p
        self.pool = orbit_augmented(digits(16, split="train"), "d4").images
        pick = torch.randperm(len(self.pool), generator=torch.Generator().manual_seed(0))
        self.data = ImageTensorDataset(self.pool[pick[:p["n_images"]]], name="digits16-d4-4096")

    def _reference(self, seed: int) -> torch.Tensor:
        pick = torch.randperm(len(self.pool), generator=torch.Generator().manual_seed(3000 + seed))
        return self.pool[pick]

    def evaluate(self, denoiser, seed: int) -> dict[str, float]:
        p = self.p
        x = sample(denoiser, (p["n_eval"], 1, 16, 16), sampler="heun", steps=p["sample_steps"],
                   seed=2000 + seed, progress=False).clamp(-1, 1)
        return {"fd": frechet_distance(x, self._reference(seed)[:p["n_eval"]])}

    def floor(self, seed: int) -> float:
        ref, n = self._reference(seed), self.p["n_eval"]
        return frechet_distance(ref[n:2 * n], ref[:n])


def one_seed(task, seed: int, out: Path) -> dict:
    p, data = task.p, task.data
    clean_idx, noisy_idx = clean_split(len(data), p["clean_fraction"], seed)
    common = dict(data="custom", image_size=task.size, data_channels=1, channels=p["channels"],
                  batch_size=p["batch_size"],
                  lr=p["lr"], ema_halflife_images=p["ema_halflife_images"], seed=seed,
                  checkpoint_every=500, progress=False, log_every=50)
    total = p["pretrain_steps"] + p["rounds"] * p["steps_per_round"]
    result: dict = {"seed": seed}
    from symfast.train import load
    for name, images in (("clean only", data.images[clean_idx]),
                         ("noisy only", NoisyDataset(data, p["tau"], seed, noisy_idx)
                          .get_batch(torch.arange(len(noisy_idx))))):
        t0 = time.perf_counter()
        folder = out / f"seed-{seed}" / name.replace(" ", "-")
        train(common, dataset=ImageTensorDataset(images), out=str(folder), steps=total)
        result[name] = task.evaluate(load(folder)[0], seed)
        print(f"seed {seed} {name}: {result[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    sfbd = run(dict(common, tau=p["tau"], clean_fraction=p["clean_fraction"], data_seed=seed,
                    pretrain_steps=p["pretrain_steps"], rounds=p["rounds"],
                    steps_per_round=p["steps_per_round"], out=str(out / f"seed-{seed}" / "sfbd"),
                    progress=True),
               dataset=data, evaluate=lambda d: task.evaluate(d, seed))
    result["sfbd"] = [{k: s[k] for k in ("stage",) + task.measures} for s in sfbd.summaries]
    result["sfbd_seconds"] = time.perf_counter() - t0
    result["floor_fd"] = task.floor(seed)
    return result


def summarise(runs: list[dict], measures: tuple[str, ...]) -> list[dict]:
    """Table rows: per model, mean and spread (max − min) over seeds of each measure."""
    def row(name, values):
        out = {"model": name}
        for key in measures:
            xs = [v[key] for v in values]
            out[key] = statistics.fmean(xs)
            out[key + "_spread"] = max(xs) - min(xs)
        return out
    rows = [row(n, [r[n] for r in runs]) for n in ("noisy only", "clean only")]
    rows.append(row("SFBD (pretrained, round 0)", [r["sfbd"][0] for r in runs]))
    rows.append(row(f"SFBD (round {len(runs[0]['sfbd']) - 1})", [r["sfbd"][-1] for r in runs]))
    rows.append({"model": "floor (two sets of clean images)", measures[0]: statistics.fmean(r["floor_fd"] for r in runs)})
    return rows


LABELS = {"pixel_fd": "pixel Fréchet distance", "posterior_mse": "posterior-mean MSE",
          "fd": "Fréchet distance (digit features)"}
TITLES = {"gmm": "the D4 Gaussian mixture (8x8)", "digits": "D4-augmented digits (16x16)"}


def plot(runs: list[dict], measures: tuple[str, ...], title: str, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(measures), figsize=(4.5 * len(measures), 3.4), squeeze=False)
    for ax, key in zip(axes[0], measures):
        label = LABELS[key]
        for i, r in enumerate(runs):
            ys = [s[key] for s in r["sfbd"]]
            ax.plot(range(len(ys)), ys, "o-", color="C0", label="SFBD" if i == 0 else None)
            ax.axhline(r["noisy only"][key], color="C3", ls="--", label="noisy only" if i == 0 else None)
            ax.axhline(r["clean only"][key], color="C2", ls=":", label="clean only" if i == 0 else None)
        ax.set_xticks(range(len(runs[0]["sfbd"])))
        ax.set_xlabel("SFBD round (0 = pretrained on the clean images)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"SFBD on {title}\n4% clean, tau = 0.5 (lower is better)", fontsize=10)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--data", choices=("gmm", "digits"), default="gmm")
    parser.add_argument("--out", help="training runs (resumable; default runs/sfbd_DATA)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    p = QUICK if args.quick else FULL_DIGITS if args.data == "digits" else FULL
    task = (MixtureTask if args.data == "gmm" else DigitsTask)(p)
    out = Path(args.out or f"runs/sfbd_{args.data}")
    runs = [one_seed(task, seed, out) for seed in range(args.seeds)]
    rows = summarise(runs, task.measures)
    print(f"\n{'model':36s} " + " ".join(f"{m:>18s}" for m in task.measures))
    for r in rows:
        cells = [(f"{r[m]:.4g}" + (f" ± {r[m + '_spread'] / 2:.2g}" if m + "_spread" in r else "")
                  if m in r else "") for m in task.measures]
        print(f"{r['model']:36s} " + " ".join(f"{c:>18s}" for c in cells))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = f"sfbd_{args.data}" + ("_quick" if args.quick else "")
    command = ("python experiments/sfbd_gmm.py" + (" --quick" if args.quick else "")
               + f" --seeds {args.seeds}" + (" --data digits" if args.data == "digits" else ""))
    write_json(results / f"{name}.json",
        {"command": command, "params": p,
         "table": rows, "runs": runs})
    png = plot(runs, task.measures, TITLES[args.data], results / f"{name}.png")
    print(f"wrote {results / (name + '.json')}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    sys.exit(main())
