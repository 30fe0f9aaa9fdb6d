"""The structure-preserving paper's claim on D4-augmented digits (16x16): the structure-preserving
variants match or beat the plain model in FD and are exactly (FA, WT) or nearly (Reg) equivariant,
WT at the cost of one network call; and equivariant noise reduction, denoise(g·y) = g·denoise(y).

    python experiments/digits_d4.py            # (~1 hour) writes experiments/results/digits_d4.{json,png}
    python experiments/digits_d4.py --quick    # a few seconds (the test runs this)

Data: scikit-learn's digits resized to 16x16, split once: the first 1500 digits under all 8 D4
elements (12,000 images, an exactly D4-invariant set) train the models; the other 297 digits are
held out for the denoising measure. Models, all UNet-shaped with channels (32, 64, 64), trained
with the same batch, steps and optimiser (symfast.train):
- plain: a UNet, no symmetry;          augment: a UNet, a random D4 element per training image;
- FA: the plain run's network, frame-averaged over D4 at sampling (8 calls per step, same weights);
- WT: an EquivariantUNet (D4-tied convolutions: exactly equivariant, one call per step);
- Reg: a UNet trained with the equivariance regulariser (weight 1, against the EMA).
Measures (symfast.metrics), per model, over ``--eval-seeds`` sampling seeds:
- FD: Fréchet distance in the shipped digit classifier's feature space between n samples (Heun,
  18 steps) and n training images (beside the FD of two disjoint sets of training images);
- equivariant-FD spread: max - min over g of FD(g·samples, reference);
- sampler equivariance: max over g of ||S(g x_T) - g S(x_T)|| / ||S(x_T)|| (Heun, deterministic);
- samples per second (the batch of n, wall clock, this machine);
- noise reduction: PSNR of denoising held-out digits y = x + σε at several σ (symfast.denoise),
  and the equivariance error of denoising, max over g of ||D(g·y) - g·D(y)|| / ||D(y)||.
The WT run is also what ships as the demo checkpoint (``--export-demo``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import save_figure, write_json  # experiments/ is on sys.path
from symfast._io import atomic_write_text
from symfast import denoise, sample
from symfast.data import ImageTensorDataset, digits, orbit_augmented
from symfast.demo import psnr
from symfast.groups import d4
from symfast.metrics import equivariant_fd, frechet_distance, sampler_equivariance
from symfast.train import export, load, train

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {  # name -> (training run, overrides, frame-average at sampling)
    "plain": ("plain", dict(equivariance="none"), False),
    "augment": ("augment", dict(equivariance="augment", group="d4"), False),
    "FA": ("plain", dict(equivariance="none"), True),
    "WT": ("wt", dict(equivariance="wt", group="d4"), False),
    "Reg": ("reg", dict(equivariance="reg", group="d4", reg_weight=1.0), False),
}
FULL = dict(steps=3000, channels=(32, 64, 64), batch_size=64, lr=1e-3, warmup_steps=200,
            ema_halflife_images=50_000, n_eval=1000, sample_steps=18, equiv_n=16,
            denoise_sigmas=(0.1, 0.2, 0.4, 0.8), denoise_n=297, denoise_steps=18)
QUICK = dict(FULL, steps=6, channels=(8, 16), batch_size=8, warmup_steps=2, ema_halflife_images=200,
             n_eval=32, sample_steps=3, equiv_n=2, denoise_sigmas=(0.2, 0.8), denoise_n=8,
             denoise_steps=3)


def split() -> tuple[ImageTensorDataset, torch.Tensor]:
    """(training set: the first 1500 digits under all of D4, held-out digits (297, 1, 16, 16))."""
    return orbit_augmented(digits(16, split="train"), "d4"), digits(16, split="test").images


def train_runs(p: dict, seed: int, out: Path, only: set[str] | None = None) -> dict[str, Path]:
    """Train (or resume, or find finished) every distinct run (those named in ``only``, when
    given: two processes can train disjoint runs side by side); returns run name -> folder."""
    data, _ = split()
    common = dict(data="custom", data_channels=1, image_size=16, channels=p["channels"],
                  batch_size=p["batch_size"], lr=p["lr"], warmup_steps=p["warmup_steps"],
                  ema_halflife_images=p["ema_halflife_images"], steps=p["steps"], seed=seed,
                  checkpoint_every=500, keep=2, log_every=50, progress=True)
    folders = {}
    for run_name, overrides, _ in VARIANTS.values():
        if run_name in folders or (only is not None and run_name not in only):
            continue
        folder = out / f"seed-{seed}" / run_name
        t0 = time.perf_counter()
        train(dict(common, **overrides), dataset=data, out=str(folder))
        print(f"run {run_name}: {time.perf_counter() - t0:.0f} s", flush=True)
        folders[run_name] = folder
    return folders


def evaluate(denoiser, p: dict, reference: torch.Tensor, held_out: torch.Tensor,
             eval_seeds: int) -> dict:
    group = d4()
    fds, spreads, rates = [], [], []
    for s in range(eval_seeds):
        t0 = time.perf_counter()
        x = sample(denoiser, (p["n_eval"], 1, 16, 16), sampler="heun", steps=p["sample_steps"],
                   seed=100 + s, progress=False).clamp(-1, 1)
        rates.append(p["n_eval"] / (time.perf_counter() - t0))
        ref = reference[torch.randperm(len(reference), generator=torch.Generator().manual_seed(s))
                        [:p["n_eval"]]]
        fds.append(frechet_distance(x, ref))
        spreads.append(equivariant_fd(x, ref, group)["spread"])
    row = {"fd": statistics.fmean(fds), "fd_spread": max(fds) - min(fds),
           "equivariant_fd_spread": statistics.fmean(spreads),
           "sampler_equivariance": sampler_equivariance(
               denoiser, group, "heun", (p["equiv_n"], 1, 16, 16), steps=p["sample_steps"], seed=7),
           "samples_per_s": statistics.median(rates), "psnr": {}, "noisy_psnr": {}}
    clean = held_out[:p["denoise_n"]]
    gen = torch.Generator().manual_seed(11)
    for sigma in p["denoise_sigmas"]:
        y = clean + sigma * torch.randn(clean.shape, generator=gen)
        row["noisy_psnr"][str(sigma)] = psnr(y, clean)
        row["psnr"][str(sigma)] = psnr(denoise(denoiser, y, sigma, steps=p["denoise_steps"]), clean)
    y = clean[:p["equiv_n"]] + 0.4 * torch.randn(clean[:p["equiv_n"]].shape, generator=gen)
    base = denoise(denoiser, y, 0.4, steps=p["denoise_steps"])
    row["denoise_equivariance"] = max(
        ((denoise(denoiser, group.act(y, k), 0.4, steps=p["denoise_steps"]) - group.act(base, k))
         .norm() / base.norm()).item() for k in range(len(group)))
    return row


def plot(table: dict, p: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in table if n != "floor"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].bar(names, [table[n]["fd"] for n in names],
                yerr=[table[n]["fd_spread"] / 2 for n in names], color="C0")
    axes[0].axhline(table["floor"]["fd"], color="k", ls=":", label="two training sets")
    axes[0].set_ylabel("FD (digit features, lower is better)")
    axes[0].legend(fontsize=8)
    axes[1].bar(names, [max(table[n]["sampler_equivariance"], 1e-8) for n in names], color="C1")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("sampler equivariance error")
    for n in names:
        sig = [float(s) for s in table[n]["psnr"]]
        axes[2].plot(sig, list(table[n]["psnr"].values()), "o-", label=n)
    axes[2].plot(sig, list(table[names[0]]["noisy_psnr"].values()), "k--", label="noisy input")
    axes[2].set_xscale("log")
    axes[2].set_xlabel("σ")
    axes[2].set_ylabel("PSNR of denoised held-out digits (dB)")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"D4-augmented digits 16x16, {p['steps']} steps x batch {p['batch_size']} per model")
    return save_figure(fig, path)


def markdown(table: dict, p: dict, command: str) -> str:
    """The README's table, from the results."""
    sigmas = [str(s) for s in p["denoise_sigmas"]]
    lines = [f"`{command}`: {p['steps']} steps x batch {p['batch_size']} per model, FD over "
             f"{p['n_eval']} samples (Heun {p['sample_steps']} steps) vs {p['n_eval']} training "
             f"images; FD of two sets of training images: {table['floor']['fd']:.2f}.", "",
             "| model | FD (mean ± half-spread) | equivariant-FD spread | sampler equivariance error "
             "| denoising equivariance error | samples/s | PSNR dB at σ = " + " / ".join(sigmas) + " |",
             "|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        if name == "floor":
            continue
        lines.append(f"| {name} | {r['fd']:.2f} ± {r['fd_spread'] / 2:.2f} | "
                     f"{r['equivariant_fd_spread']:.2f} | {r['sampler_equivariance']:.1e} | "
                     f"{r['denoise_equivariance']:.1e} | {r['samples_per_s']:.0f} | "
                     + " / ".join(f"{r['psnr'][s]:.1f}" for s in sigmas) + " |")
    first = next(iter(table.values()))
    lines.append("| noisy input | | | | | | " + " / ".join(f"{first['noisy_psnr'][s]:.1f}" for s in sigmas)
                 + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--eval-seeds", type=int, default=3)
    parser.add_argument("--n-eval", type=int, help="samples per FD (default 1000; FA costs 8x)")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--runs", help="with --train-only: train only these runs (comma list of "
                                       "plain, augment, wt, reg)")
    parser.add_argument("--export-demo", metavar="DIR", help="also export the WT run's EMA weights")
    parser.add_argument("--out", default="runs/digits_d4", help="training runs (resumable)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.n_eval is not None:
        p["n_eval"] = args.n_eval
    if args.runs and not args.train_only:
        parser.error("--runs needs --train-only")
    folders = train_runs(p, args.seed, Path(args.out), set(args.runs.split(",")) if args.runs else None)
    if args.export_demo:
        export(folders["wt"], args.export_demo, command=" ".join(
            ["python", "experiments/digits_d4.py"] + (argv if argv is not None else sys.argv[1:])))
    if args.train_only:
        return
    reference, held_out = split()
    reference = reference.images
    table = {}
    for name, (run_name, _, frame_average) in VARIANTS.items():
        t0 = time.perf_counter()
        denoiser, _ = load(folders[run_name], group="d4" if frame_average else None)
        table[name] = evaluate(denoiser, p, reference, held_out, args.eval_seeds)
        print(f"{name}: {table[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    floor = []
    for s in range(args.eval_seeds):
        perm = torch.randperm(len(reference), generator=torch.Generator().manual_seed(1000 + s))
        floor.append(frechet_distance(reference[perm[:p["n_eval"]]],
                                      reference[perm[p["n_eval"]:2 * p["n_eval"]]]))
    table["floor"] = {"fd": statistics.fmean(floor)}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = "digits_d4_quick" if args.quick else "digits_d4"
    command = ("python experiments/digits_d4.py" + (" --quick" if args.quick else "")
               + f" --seed {args.seed} --eval-seeds {args.eval_seeds}"
               + (f" --n-eval {args.n_eval}" if args.n_eval is not None else ""))
    write_json(results / f"{name}.json",
        {"command": command, "params": p,
         "table": table})
    atomic_write_text(results / f"{name}.md", markdown(table, p, command))
    png = plot(table, p, results / f"{name}.png")
    print(f"wrote {results / (name + '.json')}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    sys.exit(main())
