"""SFBD's claim at a size this machine runs: with few clean images and many noisy ones, SFBD's
model is closer to the clean distribution than a model trained on the noisy images only, and
than one trained on the clean images only.

    python experiments/sfbd_gmm.py            # (~1 hour) writes experiments/results/sfbd_gmm.{json,png}
    python experiments/sfbd_gmm.py --quick    # a few seconds (the test runs this)

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
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from symfast import sample
from symfast.data import ImageTensorDataset, NoisyDataset, clean_split, gaussian_mixture
from symfast.metrics import frechet_distance, posterior_mse
from symfast.train import train
from symfast.train.sfbd import run

RESULTS = Path(__file__).resolve().parent / "results"
SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0)

FULL = dict(n_images=4096, clean_fraction=0.04, tau=0.5, pretrain_steps=1000, rounds=3,
            steps_per_round=500, n_eval=2048, sample_steps=32, channels=(32, 64), batch_size=64,
            lr=2e-3, ema_halflife_images=20000)
QUICK = dict(FULL, n_images=256, pretrain_steps=10, rounds=2, steps_per_round=5, n_eval=64,
             sample_steps=4, channels=(8, 16), batch_size=8, ema_halflife_images=200)


def evaluate(denoiser, mixture, p: dict, seed: int) -> dict[str, float]:
    errors = posterior_mse(denoiser, mixture, SIGMAS, n=p["n_eval"], seed=1000 + seed)
    x = sample(denoiser, (p["n_eval"], 1, 8, 8), sampler="heun", steps=p["sample_steps"],
               seed=2000 + seed, progress=False)
    return {"posterior_mse": statistics.fmean(errors),
            "pixel_fd": frechet_distance(x, mixture.sample(p["n_eval"], seed=3000 + seed))}


def one_seed(p: dict, seed: int, out: Path) -> dict:
    mixture = gaussian_mixture("d4", size=8, channels=1, seed=0)
    data = mixture.dataset(p["n_images"], seed=0)
    clean_idx, noisy_idx = clean_split(len(data), p["clean_fraction"], seed)
    common = dict(data="custom", image_size=8, channels=p["channels"], batch_size=p["batch_size"],
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
        result[name] = evaluate(load(folder)[0], mixture, p, seed)
        print(f"seed {seed} {name}: {result[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    sfbd = run(dict(common, tau=p["tau"], clean_fraction=p["clean_fraction"], data_seed=seed,
                    pretrain_steps=p["pretrain_steps"], rounds=p["rounds"],
                    steps_per_round=p["steps_per_round"], out=str(out / f"seed-{seed}" / "sfbd"),
                    progress=True),
               dataset=data, evaluate=lambda d: evaluate(d, mixture, p, seed))
    result["sfbd"] = [{k: s[k] for k in ("stage", "posterior_mse", "pixel_fd")} for s in sfbd.summaries]
    result["sfbd_seconds"] = time.perf_counter() - t0
    result["floor_fd"] = frechet_distance(mixture.sample(p["n_eval"], seed=4000 + seed),
                                          mixture.sample(p["n_eval"], seed=3000 + seed))
    return result


def summarise(runs: list[dict]) -> list[dict]:
    """Table rows: per model, mean and spread (max − min) over seeds of each measure."""
    def row(name, values):
        out = {"model": name}
        for key in ("pixel_fd", "posterior_mse"):
            xs = [v[key] for v in values]
            out[key] = statistics.fmean(xs)
            out[key + "_spread"] = max(xs) - min(xs)
        return out
    rows = [row(n, [r[n] for r in runs]) for n in ("noisy only", "clean only")]
    rows.append(row("SFBD (pretrained, round 0)", [r["sfbd"][0] for r in runs]))
    rows.append(row(f"SFBD (round {len(runs[0]['sfbd']) - 1})", [r["sfbd"][-1] for r in runs]))
    rows.append({"model": "floor (two mixture sets)", "pixel_fd": statistics.fmean(r["floor_fd"] for r in runs)})
    return rows


def plot(runs: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "pixel_fd", "pixel Fréchet distance"),
                           (axes[1], "posterior_mse", "posterior-mean MSE")):
        for i, r in enumerate(runs):
            ys = [s[key] for s in r["sfbd"]]
            ax.plot(range(len(ys)), ys, "o-", color="C0", label="SFBD" if i == 0 else None)
            ax.axhline(r["noisy only"][key], color="C3", ls="--", label="noisy only" if i == 0 else None)
            ax.axhline(r["clean only"][key], color="C2", ls=":", label="clean only" if i == 0 else None)
        ax.set_xlabel("SFBD round (0 = pretrained on the clean images)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("SFBD on the D4 Gaussian mixture (8x8), 4% clean, tau = 0.5 (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", default="runs/sfbd_gmm", help="training runs (resumable)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    p = QUICK if args.quick else FULL
    runs = [one_seed(p, seed, Path(args.out)) for seed in range(args.seeds)]
    rows = summarise(runs)
    print(f"\n{'model':30s} {'pixel FD':>12s} {'posterior MSE':>16s}")
    for r in rows:
        mse = f"{r['posterior_mse']:.4g} ± {r['posterior_mse_spread'] / 2:.2g}" if "posterior_mse" in r else ""
        spread = f" ± {r['pixel_fd_spread'] / 2:.2g}" if "pixel_fd_spread" in r else ""
        print(f"{r['model']:30s} {r['pixel_fd']:8.4g}{spread:8s} {mse:>16s}")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = "sfbd_gmm_quick" if args.quick else "sfbd_gmm"
    command = "python experiments/sfbd_gmm.py" + (" --quick" if args.quick else "") + f" --seeds {args.seeds}"
    (results / f"{name}.json").write_text(json.dumps(
        {"command": command, "params": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
         "table": rows, "runs": runs}, indent=1))
    png = plot(runs, results / f"{name}.png")
    print(f"wrote {results / (name + '.json')}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    sys.exit(main())
