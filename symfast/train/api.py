"""Using what a run trained: load a checkpoint as a ready Denoiser, sample a grid, denoise images."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from symfast.denoiser import Denoiser
from symfast.groups import get
from symfast.train import checkpoint
from symfast.train.build import build_model, sampling_denoiser
from symfast.train.config import TrainConfig


def load(path: str | os.PathLike, *, ema: int | None = 0, network: nn.Module | None = None,
         device: str | torch.device = "cpu", group: str | None = None) -> tuple[Denoiser, TrainConfig]:
    """A ready Denoiser and the config of a training run.

    Args:
        path: a checkpoint folder (or its state.json / tensors file), or a run folder (its newest
            checkpoint that verifies).
        ema: which EMA copy's weights (index into the run's ``ema_halflife_images``); None for
            the raw trained weights.
        network: the network to load into, for runs of a custom model (config model "custom").
        device: where the network goes.
        group: frame-average over this group at sampling (exactly equivariant at |G| calls per
            step) in place of the run's own choice.

    The Denoiser is set up as the run samples: frame-averaged for equivariance "fa", declared
    equivariant (one call, noise transformed with the state) for "wt", plain otherwise.
    """
    from symfast._backend import check_device
    device = check_device(device)
    ckpt = checkpoint.resolve(path)
    cfg = TrainConfig.from_dict(ckpt.state["config"])
    model = network
    if model is None:
        if cfg.model == "custom":
            raise ValueError(f"checkpoint {ckpt.path} is of a custom model: pass network= (an "
                             f"nn.Module of the same architecture)")
        model = build_model(cfg, image_shape(cfg)[0])
    prefix = "model." if ema is None else f"ema.{ema}."
    if not any(k.startswith(prefix) for k in ckpt.tensors):
        copies = len(cfg.ema_halflife_images)
        what = (f"EMA copy {ema}" if ema is not None else
                "raw (non-EMA) weights: an exported checkpoint keeps only its EMA copies"
                if "exported_from" in ckpt.state else "raw (non-EMA) weights")
        raise ValueError(f"checkpoint {ckpt.path} holds no {what}; its EMA copies are "
                         f"ema=0..{copies - 1}")
    checkpoint.load_weights(model, ckpt, prefix)
    model.to(device).eval().requires_grad_(False)
    denoiser = sampling_denoiser(cfg, model)
    if group is not None:
        denoiser = Denoiser(model, cfg.prediction, cfg.schedule(), group=get(group),
                            frame_average=True)
    return denoiser, cfg


def export(path: str | os.PathLike, out: str | os.PathLike, *, ema: int = 0,
           command: str | None = None) -> Path:
    """Write the weights a run samples with, and nothing else, as a checkpoint folder ``out``
    (tensors.safetensors + state.json, written atomically) that :func:`load` reads: one EMA copy
    (index ``ema``), without the raw weights, optimiser state or RNG states (a quarter of a
    training checkpoint's size). ``path``: a checkpoint or run folder, as for :func:`load`;
    ``command``: how the run was made, recorded in state.json for whoever loads it."""
    ckpt = checkpoint.resolve(path)
    target = Path(out).resolve()
    if target == ckpt.path.resolve() or ckpt.path.resolve().is_relative_to(target):
        raise ValueError(f"out ({str(out)!r}) must not be the checkpoint being exported or a folder "
                         f"holding it ({str(ckpt.path)!r})")
    if target.exists() and (target / checkpoint.STATE).is_file():
        try:
            exported = "exported_from" in json.loads((target / checkpoint.STATE).read_text())
        except (OSError, ValueError):
            exported = False
        if not exported:
            raise ValueError(f"out ({str(out)!r}) holds a training checkpoint; refusing to replace it "
                             f"(only an earlier export is replaced)")
    if target.parent.name == "checkpoints" and checkpoint.is_checkpoint_name(target.name):
        raise ValueError(f"out ({str(out)!r}) is a checkpoint slot of a run, where resume='auto' "
                         f"would take the export for the newest training checkpoint")
    cfg = TrainConfig.from_dict(ckpt.state["config"])
    if not isinstance(ema, int) or isinstance(ema, bool) or not 0 <= ema < len(cfg.ema_halflife_images):
        raise ValueError(f"ema must be an index into the run's {len(cfg.ema_halflife_images)} EMA "
                         f"copies, got {ema!r}")
    prefix = f"ema.{ema}."
    tensors = {"ema.0." + k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
    config = dict(ckpt.state["config"], ema_halflife_images=[cfg.ema_halflife_images[ema]])
    state = {"step": ckpt.step, "nimg": ckpt.state.get("nimg"), "config": config,
             "symfast_version": ckpt.state.get("symfast_version"),
             "exported_from": {"path": str(ckpt.path), "ema": ema}}
    if command is not None:
        state["command"] = str(command)
    return checkpoint.write_folder(Path(out), tensors, state)


def image_shape(cfg: TrainConfig, channels: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the images a run trained on."""
    return (channels or cfg.data_channels or 3, cfg.image_size, cfg.image_size)


def sample_to_file(checkpoint_path: str | os.PathLike, out: str | os.PathLike, n: int = 64,
                   sampler: str = "heun", steps: int = 40, seed: int = 0, group: str | None = None,
                   ema: int | None = 0, device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """Sample ``n`` images from a checkpoint and write them as one PNG grid to ``out``.
    Returns the samples, (n, C, H, W) in [-1, 1]."""
    from symfast.data.images import check_png_path, save_image_grid
    from symfast.samplers import sample

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    check_png_path(out)
    denoiser, cfg = load(checkpoint_path, ema=ema, device=device, group=group)
    x = sample(denoiser, (n,) + image_shape(cfg), sampler=sampler, steps=steps, seed=seed,
               progress=progress, device=device).clamp(-1, 1)
    save_image_grid(x.cpu(), out)
    return x


def denoise_file(checkpoint_path: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike,
                 sigma: float, add_noise: int | None = None, sampler: str = "heun", steps: int = 40,
                 group: str | None = None, ema: int | None = 0, device: str = "cpu") -> torch.Tensor:
    """Denoise the image in file ``image`` (noise level ``sigma``) with a checkpoint's model and
    write the result to ``out``. ``add_noise``: a seed; first add noise of std σ to the image
    (to try the model on a clean image). Returns the denoised image (C, H, W) in [-1, 1]."""
    from symfast.data.images import check_png_path, read_image, save_image_grid
    from symfast.samplers import denoise

    check_png_path(out)
    denoiser, cfg = load(checkpoint_path, ema=ema, device=device, group=group)
    channels, size, _ = image_shape(cfg)
    y = read_image(image, channels=channels)
    if tuple(y.shape[-2:]) != (size, size):
        raise ValueError(f"image {str(image)!r} is {y.shape[-2]}x{y.shape[-1]}; the model was "
                         f"trained on {size}x{size} images")
    y = y[None].to(device)
    if add_noise is not None:
        gen = torch.Generator().manual_seed(int(add_noise))
        y = y + sigma * torch.randn(y.shape, generator=gen).to(device)
    x = denoise(denoiser, y, sigma, sampler=sampler, steps=steps).clamp(-1, 1)
    save_image_grid(x[0].cpu(), out, padding=0)
    return x[0]
