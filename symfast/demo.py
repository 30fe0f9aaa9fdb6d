"""`symfast demo`: what symfast is for, in seconds and offline, from a model symfast trained.

The shipped checkpoint (``symfast/assets/demo-d4-digits``: an EquivariantUNet with D4-tied
convolutions trained by symfast on D4-augmented digits, EMA weights only, ~1.4 MB; made by
``python experiments/digits_d4.py --export-demo symfast/assets/demo-d4-digits``) is loaded with
:func:`symfast.train.load`, then:

- samples a grid of digits (Heun, deterministic) and times it;
- measures the sampler's equivariance, max over g of ‖S(g x_T) − g S(x_T)‖ / ‖S(x_T)‖;
- denoises noisy held-out digits y and their rotated copies g·y (symfast.denoise) and measures
  ‖D(g·y) − g·D(y)‖ / ‖D(y)‖, beside the PSNR before and after denoising.

It writes ``samples.png``, ``denoise.png`` (enlarged 3x, each pixel a 3x3 block) and
``summary.json`` into ``out`` (each atomically).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

DEMO_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "demo-d4-digits"
ROTATION = 1  # the group element the denoising figure shows: a quarter turn in C4 and D4


def _writable_folder(out: str | os.PathLike) -> Path:
    """``out`` created if needed and probed for writing: ValueError naming it otherwise (before
    any work is done, so nothing is half-written). Temporaries an earlier, killed run left there
    are removed."""
    if isinstance(out, str) and not out.strip():
        raise ValueError("out must name a folder, got an empty string")
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"out={str(out)!r} cannot be written: {exc.strerror or exc}") from None
    from symfast._io import remove_stale_temporaries
    remove_stale_temporaries(folder)  # a run killed while writing its files left them
    return folder


def psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of images in [-1, 1] (peak-to-peak 2), x clamped."""
    mse = (x.clamp(-1, 1) - reference).double().pow(2).mean()
    return float(10 * torch.log10(4.0 / mse))


def run(out: str | os.PathLike = "symfast-demo", checkpoint: str | os.PathLike | None = None,
        n: int = 64, steps: int = 18, sigma: float = 0.5, seed: int = 0,
        device: str = "cpu") -> dict:
    """Run the demo on ``checkpoint`` (default: the shipped one) and write its files to ``out``.

    Args:
        n: how many digits to sample (the grid).
        steps: Heun steps for sampling and denoising.
        sigma: the noise level of the noisy digits to denoise.
        seed: the sampling noise and the denoising example's noise.
    Returns the summary that is also written to ``out/summary.json``.
    """
    from symfast.data import digits, save_image_grid
    from symfast.metrics import sampler_equivariance
    from symfast.samplers import denoise, sample
    from symfast.train import load
    from symfast.train.api import image_shape

    for name, value in (("n", n), ("steps", steps), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "seed" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'seed' else 'positive'} "
                             f"int, got {value!r}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool):
        raise ValueError(f"sigma must be a number, got {sigma!r}")
    label = "symfast/assets/demo-d4-digits (shipped)" if checkpoint is None else str(checkpoint)
    checkpoint = DEMO_CHECKPOINT if checkpoint is None else checkpoint
    denoiser, cfg = load(checkpoint, device=device)
    group = denoiser.group
    if group is None:
        trained = f", group {cfg.group}" if cfg.group else ""
        raise ValueError(f"checkpoint {label!r} samples without a group (equivariance "
                         f"{cfg.equivariance!r}{trained}): the demo shows exact equivariance, so it "
                         f"needs one trained with equivariance 'wt' or 'fa'")
    # the model's own range (the loaded schedule's), before 64 digits are sampled for nothing
    denoiser.schedule.check_sigma(sigma)
    shape = image_shape(cfg)
    folder = _writable_folder(out)  # after the checks: a bad argument leaves nothing

    t0 = time.perf_counter()
    x = sample(denoiser, (n,) + shape, sampler="heun", steps=steps, seed=seed, progress=False,
               device=device).clamp(-1, 1).cpu()
    seconds = time.perf_counter() - t0
    sampler_error = sampler_equivariance(denoiser, group, "heun", (8,) + shape, steps=steps,
                                         seed=seed + 1)

    # Held-out digits when the model makes digit-like images, its own samples otherwise.
    clean = (digits(shape[-1], split="test").images[:8] if shape[0] == 1 else x[:8]).to(device)
    gen = torch.Generator().manual_seed(seed)
    y = clean + sigma * torch.randn(clean.shape, generator=gen).to(device)
    g = ROTATION if len(group) > ROTATION else 0
    d_y = denoise(denoiser, y, sigma, steps=steps)
    g_y = group.act(y, g)
    d_g_y = denoise(denoiser, g_y, sigma, steps=steps)
    g_d_y = group.act(d_y, g)
    denoise_error = float((d_g_y - g_d_y).double().norm() / d_y.double().norm())

    summary = {
        "checkpoint": label, "model": type(denoiser.model).__name__,
        "group": group.name, "equivariance": cfg.equivariance,
        "n": n, "steps": steps, "sampler": "heun", "sample_seconds": seconds,
        "ms_per_sample": 1000 * seconds / n,
        "sampler_equivariance_error": sampler_error,
        "denoise": {"sigma": sigma, "element": g, "psnr_noisy": psnr(y, clean),
                    "psnr_denoised": psnr(d_y, clean), "equivariance_error": denoise_error},
        "files": ["samples.png", "denoise.png", "summary.json"],
    }
    save_image_grid(x, folder / "samples.png", scale=3)
    # rows: clean, noisy y, D(y), g·y, D(g·y), g·D(y)
    rows = torch.cat([clean, y, d_y, g_y, d_g_y, g_d_y]).cpu()
    save_image_grid(rows, folder / "denoise.png", nrow=len(clean), scale=3)
    from symfast._io import atomic_write_text
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=1))
    return summary


def format_summary(summary: dict, out: str | os.PathLike) -> str:
    """The demo's short table, as printed by `symfast demo`."""
    d = summary["denoise"]
    lines = [
        f"model: {summary['model']} ({summary['equivariance']}, group {summary['group']}) "
        f"from {summary['checkpoint']}",
        f"{'sampled digits':38s} {summary['n']} in {summary['sample_seconds']:.2f} s "
        f"({summary['ms_per_sample']:.1f} ms per sample, Heun {summary['steps']} steps)",
        f"{'sampler equivariance error':38s} {summary['sampler_equivariance_error']:.2e}  "
        f"(max_g |S(g x) - g S(x)| / |S(x)|)",
        f"{'denoising at sigma ' + format(d['sigma'], 'g'):38s} PSNR {d['psnr_noisy']:.1f} dB -> "
        f"{d['psnr_denoised']:.1f} dB",
        f"{'denoising equivariance error':38s} {d['equivariance_error']:.2e}  "
        f"(|D(g y) - g D(y)| / |D(y)|, g = element {d['element']})",
        f"wrote {', '.join(str(Path(out) / f) for f in summary['files'])}",
    ]
    return "\n".join(lines)
