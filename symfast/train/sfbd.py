"""SFBD (stochastic forward-backward deconvolution): train a diffusion model from noisy images
y = x + τ ε and a few clean ones, as one resumable command that scales out with torchrun.

    pretrain      the training loop on the clean subset                       OUT/pretrain/
    round k       backward: every noisy y denoised by the reverse PF-ODE from σ = τ with the
                  current EMA model, clipped to [-1, 1], each rank its own shards
                                                                          OUT/round-k/denoised/
                  forward: fine-tune from the previous weights on the denoised set (∪ clean),
                  EMA restarted without ramp-up (EDM's --transfer), its half-life at most a
                  tenth of the stage's images (stage_ema_halflife_images)  OUT/round-k/
    online mode   one run on clean ∪ denoised; every ``refresh_every`` steps a fraction of the
                  denoised set is denoised again by the latest EMA, the denoised images' loss
                  weight ramped from 0 to 1 over ``ramp_steps``          OUT/online/

Everything is deterministic (the observation noise is fixed per image, the ODE has no noise, a
stochastic backward sampler's noise is seeded per (train seed, stage, image), the loop's
randomness is counter-based), so a killed run started again with the same ``out`` redoes nothing
that finished: a round with its summary.json is skipped, a shard that verifies is kept (a missing
or damaged one is denoised again), and training resumes from its checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from symfast._io import atomic_write_bytes, atomic_write_text
from symfast.data.images import ImageTensorDataset
from symfast.data.noisy import NoisyDataset, clean_split
from symfast.ops import _checks
from symfast.philox import seeded_generator
from symfast.train import checkpoint
from symfast.train.config import (MODEL_FIELDS, TrainConfig, check_field_types, check_out_folder,
                                  config_values, read_config_file)
from symfast.train.distributed import World, setup
from symfast.train.loop import mix

log = logging.getLogger("symfast.sfbd")

MODES = ("rounds", "online")
# Fields whose change makes an existing output folder another experiment (refused on resume).
_EXPERIMENT_FIELDS = ("tau", "clean_fraction", "data_seed", "pretrain_steps", "steps_per_round",
                      "denoise_steps", "denoise_sampler", "merge_clean", "mode", "refresh_every",
                      "refresh_fraction", "ramp_steps", "shard_size", "denoise_batch")
# every training setting that changes the result (a rerun that changed one fine-tuned the next
# stage with it, and sfbd.json then claimed it for the stages before)
_TRAIN_EXPERIMENT_FIELDS = MODEL_FIELDS + (
    "data", "dataset_size", "seed", "batch_size", "lr", "reg_weight", "p_mean", "p_std",
    "weight_decay", "adam_betas", "warmup_steps", "lr_schedule", "grad_clip", "ema_halflife_images",
    "ema_rampup", "precision")


@dataclass
class SFBDConfig:
    """An SFBD run. ``train`` holds the training loop's settings (model, batch, lr, EMA, ...);
    its ``steps``, ``out``, ``init_from`` and ``resume`` are set per stage.

    tau: the noise level of the observations (σ units of the schedule).
    clean_fraction: the share of images seen clean (the rest only noisy), split by ``data_seed``,
        which also fixes each image's observation noise.
    rounds, pretrain_steps, steps_per_round: the schedule of training (online mode trains
        ``rounds · steps_per_round`` steps after pretraining).
    denoise_steps, denoise_sampler: the backward step's grid (the ``denoise_steps``-step ρ = 7
        EDM grid truncated to start at τ) and sampler ("heun", S_churn = 0: the PF-ODE; a
        stochastic one draws each image's noise from (train.seed, the stage, its index)).
    Each fine-tuning stage (a round; the online run) restarts the EMA without ramp-up, with
    every ``train.ema_halflife_images`` capped at a tenth of the images the stage trains on
    (:func:`stage_ema_halflife_images`, recorded in the stage's config and summary).
    denoise_batch, shard_size: images per network batch and per shard file.
    merge_clean: train each round on the denoised set ∪ the clean set (default: the denoised
        set only). The reference code's fine-tuning reads the one image folder it is given.
    mode: "rounds" or "online"; online: ``refresh_every``, ``refresh_fraction``, ``ramp_steps``.
    fd_samples: after each stage, the Fréchet distance of this many samples of the stage's EMA
        model (Heun, 18 steps, seeded by ``data_seed``) to the whole clean dataset goes into its
        summary as ``fd`` (symfast.metrics.frechet_distance: the shipped digit classifier's
        features for data="digits", the pixels otherwise); 0: none.
    """

    tau: float = 0.5
    clean_fraction: float = 0.04
    rounds: int = 4
    pretrain_steps: int = 2000
    steps_per_round: int = 1000
    denoise_steps: int = 40
    denoise_sampler: str = "heun"
    denoise_batch: int = 256
    shard_size: int = 1024
    merge_clean: bool = False
    mode: str = "rounds"
    refresh_every: int = 200
    refresh_fraction: float = 0.25
    ramp_steps: int = 1000
    data_seed: int = 0
    fd_samples: int = 0
    out: str = "runs/sfbd"
    progress: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "SFBDConfig":
        """Raise ValueError/TypeError naming the first bad field; returns self."""
        check_field_types(self, skip=("train",))
        check_out_folder(self.out)
        for name in ("rounds", "pretrain_steps", "steps_per_round", "denoise_steps", "denoise_batch",
                     "shard_size", "refresh_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.ramp_steps, bool) or not isinstance(self.ramp_steps, int) or self.ramp_steps < 0:
            raise ValueError(f"ramp_steps must be a non-negative int, got {self.ramp_steps!r}")
        if isinstance(self.fd_samples, bool) or not isinstance(self.fd_samples, int) \
                or self.fd_samples < 0 or self.fd_samples == 1:
            raise ValueError(f"fd_samples must be 0 (no Fréchet distance) or an int >= 2, got "
                             f"{self.fd_samples!r}")
        if isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int) \
                or not 0 <= self.data_seed < 2**63:
            raise ValueError(f"data_seed must be an int in [0, 2^63), got {self.data_seed!r}")
        schedule = self.train.schedule()
        check_tau(self.tau, schedule)
        # every image clean would leave SFBD no noisy one to denoise (the run failed at its start)
        for name, whole in (("clean_fraction", False), ("refresh_fraction", True)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not (0 < value <= 1 if whole else 0 < value < 1)):
                raise ValueError(f"{name} must be in (0, 1{']' if whole else ')'}, got {value!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        from symfast.samplers.loops import SAMPLERS
        if self.denoise_sampler not in SAMPLERS:
            raise ValueError(f"denoise_sampler must be one of {sorted(SAMPLERS)}, got "
                             f"{self.denoise_sampler!r}")
        schedule.check_steps(self.denoise_steps)
        if self.train.model == "custom":
            raise ValueError("SFBD builds its model from the config: model='custom' is not supported")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        out["train"] = self.train.to_dict()
        return out

    def mismatches(self, other: "SFBDConfig") -> list[str]:
        """The experiment-defining fields in which two configs differ, 'field: self vs other'."""
        mine, theirs = self.to_dict(), other.to_dict()
        wrong = [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in _EXPERIMENT_FIELDS if mine[k] != theirs[k]]
        return wrong + [f"train.{k}: {mine['train'][k]!r} vs {theirs['train'][k]!r}"
                        for k in _TRAIN_EXPERIMENT_FIELDS if mine["train"][k] != theirs["train"][k]]


def check_tau(tau: Any, schedule) -> None:
    """ValueError naming tau unless it is a number in the schedule's [sigma_min, sigma_max]: the
    backward step starts at σ = τ, and outside that range it failed only later (after
    pretraining, in a run), naming sigma. ``symfast sfbd`` and ``symfast profile sfbd`` share it."""
    _checks.finite_number("tau", tau, positive=True)
    sigma_min, sigma_max = float(schedule.sigma_min), float(schedule.sigma_max)
    if not sigma_min <= tau <= sigma_max:
        raise ValueError(f"tau={tau} is outside the schedule's noise levels "
                         f"[sigma_min={sigma_min:g}, sigma_max={sigma_max:g}]")


_SFBD_FIELDS = tuple(f.name for f in dataclasses.fields(SFBDConfig) if f.name != "train")
# Training fields SFBD sets for each stage itself: given by a user, they would be ignored.
_PER_STAGE = {"steps": "steps (pretrain_steps, steps_per_round)",
              "resume": "resume (a run resumes from its out folder)",
              "init_from": "init_from (each round starts from the previous stage's weights)"}


def make_sfbd_config(config: SFBDConfig | dict[str, Any] | str | os.PathLike | None = None,
                     **overrides: Any) -> SFBDConfig:
    """A checked SFBDConfig from a config, a dict or a JSON/TOML file (SFBD fields at the top or
    under [sfbd], training fields under [train] or at the top), with ``overrides`` (either kind
    of field) laid over it."""
    values = config_values(config, SFBDConfig, _read_file, overrides)
    train_values = values.pop("train", None) or {}
    train_values = dict(train_values.to_dict() if isinstance(train_values, TrainConfig) else train_values)
    # per-stage fields at their defaults pass: a saved SFBD config (or an SFBDConfig) holds them
    default = TrainConfig()
    given = {k for k in _PER_STAGE
             if values.get(k, getattr(default, k)) != getattr(default, k)
             or train_values.get(k, getattr(default, k)) != getattr(default, k)}
    sfbd_values = {k: values.pop(k) for k in list(values) if k in _SFBD_FIELDS}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - train_fields)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; SFBD fields: {sorted(_SFBD_FIELDS)}; "
                         f"training fields: {sorted(train_fields)}")
    per_stage = sorted(given)
    if per_stage:
        raise ValueError(f"{per_stage} cannot be given to SFBD: it sets each stage's "
                         + "; ".join(_PER_STAGE[k] for k in per_stage))
    train_values.update(values)  # whatever is left is a training field (checked by TrainConfig)
    train_values["progress"] = sfbd_values.get("progress", True)
    train_cfg = TrainConfig.from_dict(train_values).validate()
    return SFBDConfig(train=train_cfg, **sfbd_values).validate()


def _read_file(path: str | os.PathLike) -> dict[str, Any]:
    values = read_config_file(path)
    values.update(values.pop("sfbd", {}))
    return values


@dataclass
class SFBDResult:
    """What ``run`` leaves: the output folder, the final checkpoint and one summary per stage."""

    out: Path
    checkpoint: Path
    summaries: list[dict[str, Any]]
    rank: int = 0  # this process's rank under torchrun (the CLI prints its line on rank 0 only)


Evaluate = Callable[[Any], dict[str, float]]


def run(config: SFBDConfig | dict | str | None = None, *, dataset: ImageTensorDataset | None = None,
        evaluate: Evaluate | None = None, device: str | torch.device | None = None,
        **overrides: Any) -> SFBDResult:
    """Run SFBD end to end (or resume it) in ``out``; under torchrun every rank calls this.

    Args:
        config: an SFBDConfig, a dict, or a JSON/TOML file; ``overrides`` (SFBD or training
            fields) are laid over it: ``run(tau=0.5, rounds=2, batch_size=32, out="runs/s")``.
        dataset: the clean images (an ImageTensorDataset) instead of the training config's data.
        evaluate: called on rank 0 with the EMA Denoiser after each stage; its dict goes into
            the stage's summary (e.g. an exact error on a Gaussian mixture).
        device: "cpu", "cuda", ... (default: cuda:LOCAL_RANK when CUDA is available).
    """
    if dataset is not None:
        overrides["data"] = "custom"
    cfg = make_sfbd_config(config, **overrides)
    world = setup(device)
    try:
        return _SFBD(cfg, world, dataset, evaluate).run()
    finally:
        world.close()


def data_fingerprint(images: torch.Tensor) -> str:
    """A hash of the images' shape, dtype and bytes (BLAKE2b, 16 bytes hex): one pass over memory,
    as the dataset's finiteness check already makes."""
    import hashlib
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{tuple(images.shape)} {images.dtype}".encode())
    flat = images.detach().cpu().contiguous().reshape(-1)
    digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.safetensors"


def read_shard(path: Path, positions: torch.Tensor | None = None,
               shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor] | None:
    """A shard's tensors {"index", "x"}, or None when it is missing, unreadable, or not the shard
    expected (other positions, another image shape, a non-finite value)."""
    from safetensors.torch import load as safetensors_load
    try:
        tensors = safetensors_load(path.read_bytes())
    except (OSError, ValueError, RuntimeError, Exception):  # safetensors raises its own errors
        return None
    index, x = tensors.get("index"), tensors.get("x")
    if index is None or x is None or index.dim() != 1 or x.shape[:1] != index.shape:
        return None
    if positions is not None and not torch.equal(index, positions):
        return None
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        return None
    if not torch.isfinite(x).all():
        return None
    return {"index": index, "x": x}


def shard_spans(positions: torch.Tensor, shard_size: int) -> list[torch.Tensor]:
    """The positions of each shard: shard j holds positions[j·shard_size : (j+1)·shard_size]."""
    return [positions[start:start + shard_size] for start in range(0, len(positions), shard_size)]


def denoise_into_shards(denoiser, noisy: NoisyDataset, positions: torch.Tensor, folder: Path,
                        world: World, *, steps: int, sampler: str, batch: int, shard_size: int,
                        seed: int = 0, clip: tuple[float, float] | None = None,
                        progress: bool = False, desc: str = "denoise") -> tuple[torch.Tensor, int]:
    """Denoise the noisy images at ``positions`` (from σ = τ down to 0) into shard files in
    ``folder``: shard j holds positions[j·shard_size : (j+1)·shard_size], rank r writes the
    shards j ≡ r (mod ranks), each in batches of ``batch`` (so the numbers do not depend on the
    number of ranks). Shards already there and valid are kept. A stochastic sampler's noise for
    an image is seeded by mix(``seed``, the image's index in the dataset): its own, whatever the
    batch, rank or resume. ``clip``: the data's value range (lo, hi), which the denoised images
    are clipped to (the reference stores 8-bit PNGs; the float values are kept, not quantised).

    Returns the denoised images for ``positions`` in order and the number of images this call
    denoised (all ranks together; the kept shards' images not counted), on every rank."""
    from tqdm.auto import tqdm

    from symfast.samplers import denoise
    from safetensors.torch import save as safetensors_save

    shape = tuple(noisy.shape)
    spans = shard_spans(positions, shard_size)
    n_shards = len(spans)
    mine = [j for j in range(world.rank, n_shards, world.size)]
    todo = [j for j in mine if read_shard(shard_path(folder, j), spans[j], shape) is None]
    if world.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.glob(".shard-*.tmp"):  # a shard write that a kill interrupted
            leftover.unlink(missing_ok=True)
    world.barrier()
    bar = tqdm(total=sum(len(spans[j]) for j in todo), desc=desc, unit="img", dynamic_ncols=True,
               disable=not (progress and world.is_main))
    if todo and denoiser is None:
        raise RuntimeError(f"shards in {folder} are missing and no model was given to denoise them")
    device = next(iter(denoiser.model.parameters())).device if todo else None
    for j in todo:
        parts = []
        for start in range(0, len(spans[j]), batch):
            where = spans[j][start:start + batch]
            y = noisy.get_batch(where).to(device)
            seeds = [mix(seed, index) for index in noisy.indices[where].tolist()]
            with torch.no_grad():
                x = denoise(denoiser, y, noisy.tau, sampler=sampler, steps=steps, seed=seeds)
            x = x.float()
            parts.append((x.clamp_(*clip) if clip is not None else x).cpu())
            bar.update(len(where))
        atomic_write_bytes(shard_path(folder, j),
                           safetensors_save({"index": spans[j].clone(), "x": torch.cat(parts)}))
    bar.close()
    denoised_here = world.all_reduce_sum(
        torch.tensor([sum(len(spans[j]) for j in todo)], device=world.device))
    world.barrier()
    out = []
    for j in range(n_shards):
        shard = read_shard(shard_path(folder, j), spans[j], shape)
        if shard is None:
            raise RuntimeError(f"shard {shard_path(folder, j)} is missing or damaged after the "
                               f"denoising step (was the folder changed while the run was going?)")
        out.append(shard["x"])
    return torch.cat(out), int(denoised_here)


class _WeightedUnion:
    """Clean ∪ denoised images as one dataset; denoised images' loss weight ramps in with the step."""

    def __init__(self, clean: torch.Tensor, denoised: torch.Tensor, ramp_steps: int, start_step: int = 0):
        self.images = torch.cat([clean, denoised]).contiguous()
        self.n_clean, self.ramp_steps, self.start_step = len(clean), ramp_steps, start_step

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def get_batch(self, index: torch.Tensor) -> torch.Tensor:
        return self.images.index_select(0, index)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]

    def loss_weights(self, index: torch.Tensor, step: int) -> torch.Tensor:
        ramp = 1.0 if self.ramp_steps == 0 else min(1.0, (step - self.start_step + 1) / self.ramp_steps)
        return torch.where(index < self.n_clean, 1.0, ramp)


class _SFBD:
    """One SFBD run on one rank."""

    def __init__(self, cfg: SFBDConfig, world: World, dataset: ImageTensorDataset | None,
                 evaluate: Evaluate | None):
        from symfast.train.build import build_dataset, check_dataset, pixel_range
        self.cfg, self.world, self.evaluate = cfg, world, evaluate
        base = cfg.train
        data = dataset if dataset is not None else build_dataset(base)
        if not isinstance(data, ImageTensorDataset):
            raise TypeError(f"dataset must be an ImageTensorDataset, got {type(data).__name__}")
        check_dataset(base, data)
        clean_idx, noisy_idx = clean_split(len(data), cfg.clean_fraction, cfg.data_seed)
        if len(clean_idx) < base.batch_size:
            raise ValueError(f"clean_fraction={cfg.clean_fraction} leaves {len(clean_idx)} clean "
                             f"images of {len(data)}, fewer than one batch (batch_size="
                             f"{base.batch_size})")
        if len(noisy_idx) == 0:
            raise ValueError(f"clean_fraction={cfg.clean_fraction} leaves no noisy image of {len(data)}")
        self.clean = data.images[clean_idx]
        self.reference = data.images  # the clean distribution the Fréchet distance measures against
        self.noisy = NoisyDataset(data, cfg.tau, cfg.data_seed, noisy_idx)
        self.clip = pixel_range(base)
        self.positions = torch.arange(len(self.noisy), dtype=torch.int64)
        self.out = Path(cfg.out)
        self.summaries: list[dict[str, Any]] = []

    # ---- bookkeeping -------------------------------------------------------------------------
    def _check_folder(self) -> None:
        """Rank 0: refuse an output folder of another experiment (another config, or other
        images under the same config); record this config and the images' fingerprint."""
        error = None
        if self.world.is_main:
            saved = self.out / "sfbd.json"
            fingerprint = data_fingerprint(self.reference)
            if saved.exists():
                try:
                    values = json.loads(saved.read_text())
                    # a record of an older symfast has none: it is taken as this data's
                    old_fingerprint = values.pop("data_fingerprint", fingerprint)
                    old = make_sfbd_config(values)
                    wrong = self.cfg.mismatches(old)
                    if wrong:
                        error = (f"out={str(self.out)!r} holds an SFBD run with another config; "
                                 f"mismatching fields (this run vs saved): {'; '.join(wrong)}")
                    elif old_fingerprint != fingerprint:
                        # the config names a dataset passed in only as "custom", and an image
                        # folder's files may change under the same path
                        source = ("dataset (passed to run)" if self.cfg.train.data == "custom"
                                  else f"data={self.cfg.train.data!r}")
                        error = (f"out={str(self.out)!r} holds an SFBD run on other images: the "
                                 f"{source} differs from the one it was made with (data "
                                 f"fingerprint {fingerprint} vs saved {old_fingerprint}); pass "
                                 f"that dataset or use another out")
                except (ValueError, TypeError, AttributeError, json.JSONDecodeError) as exc:
                    error = f"out={str(self.out)!r}: its sfbd.json cannot be read ({exc})"
            record = {k: v for k, v in self.cfg.to_dict().items() if k != "out"}  # may be moved
            record["data_fingerprint"] = fingerprint
            text = json.dumps(record, indent=1, sort_keys=True)
            if error is None and (not saved.exists() or saved.read_text() != text):
                atomic_write_text(saved, text)
        error = self.world.broadcast(error)
        if error:
            raise ValueError(error)

    def _train(self, dataset, out: Path, steps: int, **extra: Any):
        from symfast.train.loop import train
        values = dict(self.cfg.train.to_dict(), out=str(out), steps=steps, resume="auto")
        values.update(extra)
        return train(values, dataset=dataset, device=self.world.device)

    def _summary(self, name: str, folder: Path, **values: Any) -> dict[str, Any]:
        """The stage's summary (rank 0 evaluates and writes it; every rank returns it). Its
        ``loss`` is the last one the stage's metrics.csv logged: a run resumed after its training
        had finished trains nothing, and its summary must still be the uninterrupted run's."""
        summary: dict[str, Any] | None = None
        if self.world.is_main:
            summary = {"stage": name, "loss": _last_logged_loss(folder), **values}
            if self.evaluate is not None or self.cfg.fd_samples:
                denoiser = self._denoiser(folder)
                if self.cfg.fd_samples:
                    summary.update(self._fd(denoiser))
                if self.evaluate is not None:
                    summary.update(self.evaluate(denoiser))
                    summary["evaluated"] = True
            atomic_write_text(folder / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
        return self.world.broadcast(summary)

    def _finished(self, folder: Path) -> dict[str, Any] | None:
        """The summary of a finished stage (None: not finished). A finished stage is not run
        again, so what its summary lacks is computed here, from the stage's checkpoint, instead
        of silently missing: an ``fd_samples`` (a rerun that added --fd-samples or changed it)
        and an ``evaluate`` (a rerun that passed one; its summary then says ``evaluated``)."""
        path = folder / "summary.json"
        done = None
        if self.world.is_main and path.exists():
            try:
                done = json.loads(path.read_text())
            except json.JSONDecodeError:
                done = None
            if isinstance(done, dict):
                stage = done.get("stage", folder.name)
                fd = bool(self.cfg.fd_samples) and done.get("fd_samples") != self.cfg.fd_samples
                evaluate = self.evaluate is not None and not done.get("evaluated")
                if fd or evaluate:
                    denoiser = self._denoiser(folder)
                    if fd:
                        log.info("%s: computing fd of fd_samples=%d samples for the finished stage",
                                 stage, self.cfg.fd_samples)
                        done.update(self._fd(denoiser))
                    if evaluate:
                        log.info("%s: evaluating the finished stage", stage)
                        done.update(self.evaluate(denoiser))
                        done["evaluated"] = True
                    atomic_write_text(path, json.dumps(done, indent=1, sort_keys=True))
        return self.world.broadcast(done)

    def _print(self, summary: dict[str, Any]) -> None:
        if self.world.is_main and self.cfg.progress:
            keys = [k for k in summary if k not in ("stage", "evaluated")]
            print(f"[sfbd] {summary['stage']}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                ((k, summary[k]) for k in keys)), flush=True)

    def _fd(self, denoiser) -> dict[str, Any]:
        """{"fd": the Fréchet distance of ``fd_samples`` samples of ``denoiser`` to the clean
        images, "fd_samples": that count} (the count kept so that a rerun with another one is
        seen)."""
        from symfast.metrics import frechet_distance
        from symfast.samplers.api import sample
        shape = (self.cfg.fd_samples, *self.reference.shape[1:])
        with torch.no_grad():
            x = sample(denoiser, shape, sampler="heun", steps=18, seed=self.cfg.data_seed,
                       progress=False).clamp(-1, 1).cpu()
        fd = frechet_distance(x, self.reference, None if self.cfg.train.data == "digits" else "pixels")
        return {"fd": fd, "fd_samples": self.cfg.fd_samples}

    def _denoised_error(self, denoised: torch.Tensor, positions: torch.Tensor) -> float:
        """Mean squared error of the denoised images against the clean ones (known here)."""
        return float((denoised - self.noisy.clean_batch(positions)).pow(2).mean())

    # ---- stages ------------------------------------------------------------------------------
    def run(self) -> SFBDResult:
        self._check_folder()
        pretrain = self.out / "pretrain"
        done = self._finished(pretrain)
        if done is None:
            start = time.perf_counter()
            self._train(ImageTensorDataset(self.clean, "clean"), pretrain, self.cfg.pretrain_steps)
            done = self._summary("pretrain", pretrain, train_seconds=time.perf_counter() - start,
                                 images=len(self.clean))
        self.summaries.append(done)
        self._print(done)
        last = pretrain
        if self.cfg.mode == "rounds":
            for k in range(1, self.cfg.rounds + 1):
                last = self._round(k, last)
        else:
            last = self._online(pretrain)
        final = checkpoint.resolve(last)
        return SFBDResult(self.out, final.path, self.summaries, self.world.rank)

    def _denoiser(self, source: Path):
        from symfast.train.api import load
        return load(source, device=self.world.device)[0]

    def _round(self, k: int, previous: Path) -> Path:
        cfg, folder = self.cfg, self.out / f"round-{k}"
        done = self._finished(folder)
        if done is None:
            start = time.perf_counter()
            denoised, count = denoise_into_shards(
                self._denoiser(previous), self.noisy, self.positions, folder / "denoised",
                self.world, steps=cfg.denoise_steps, sampler=cfg.denoise_sampler,
                batch=cfg.denoise_batch, shard_size=cfg.shard_size,
                seed=mix(cfg.train.seed, _ROUND_NOISE, k), clip=self.clip, progress=cfg.progress,
                desc=f"round {k} denoise")
            backward_seconds = time.perf_counter() - start
            data = torch.cat([denoised, self.clean]) if cfg.merge_clean else denoised
            halflife = stage_ema_halflife_images(cfg, cfg.steps_per_round)
            start = time.perf_counter()
            self._train(ImageTensorDataset(data, f"round-{k}"), folder, cfg.steps_per_round,
                        init_from=str(previous), ema_rampup=None, ema_halflife_images=halflife,
                        seed=_stage_seed(cfg.train.seed, k))
            # the shards kept from a killed run were not denoised in this time
            rate = count / backward_seconds if count else None
            done = self._summary(f"round {k}", folder, backward_seconds=backward_seconds,
                                 forward_seconds=time.perf_counter() - start,
                                 denoised_per_second=rate, ema_halflife_images=list(halflife),
                                 denoised_mse=self._denoised_error(denoised, self.positions))
        self.summaries.append(done)
        self._print(done)
        return folder

    def _online(self, pretrain: Path) -> Path:
        """Training on clean ∪ denoised in segments of ``refresh_every`` steps; before segment j
        (j ≥ 1) the denoised images at :func:`refresh_positions` (j) (round(refresh_fraction·N)
        of them) are denoised again with the EMA at step j·refresh_every."""
        cfg, folder = self.cfg, self.out / "online"
        total = cfg.rounds * cfg.steps_per_round
        done = self._finished(folder)
        if done is not None:
            self.summaries.append(done)
            self._print(done)
            return folder
        # the checkpoint the segment's train(resume="auto") goes on from
        newest = checkpoint.latest(folder, training=True) if self.world.is_main else None
        found = self.world.broadcast(newest.step if newest is not None else 0)
        segment = min(found, total) // cfg.refresh_every
        initial = folder / "refresh-0000"
        denoised = self._refresh(self._denoiser(pretrain), self.positions, initial, 0)
        halflife = stage_ema_halflife_images(cfg, total)
        start, backward_seconds = time.perf_counter(), 0.0
        for j in range(0, math.ceil(total / cfg.refresh_every)):
            if j >= 1:
                chunk = refresh_positions(len(self.noisy), cfg.refresh_fraction, cfg.data_seed, j)
                source = checkpoint.path_for(folder, j * cfg.refresh_every)
                refresh = folder / f"refresh-{j:04d}"
                tick = time.perf_counter()
                if j >= segment:  # this run reaches the refresh: it may need the model
                    denoiser = self._denoiser(source) if self._needs(refresh, chunk) else None
                else:
                    denoiser = None
                denoised[chunk] = self._refresh(denoiser, chunk, refresh, j)
                backward_seconds += time.perf_counter() - tick
            if j < segment:
                continue
            union = _WeightedUnion(self.clean, denoised, cfg.ramp_steps)
            # each segment is a train(resume="auto") going on from the previous one's
            # checkpoint; only the first segment this process trains can be a real resume
            with _quiet_resume(j > segment):
                self._train(union, folder, min(total, (j + 1) * cfg.refresh_every),
                            init_from=str(pretrain), ema_rampup=None,
                            ema_halflife_images=halflife, seed=_stage_seed(cfg.train.seed, 1))
        done = self._summary("online", folder, seconds=time.perf_counter() - start,
                             backward_seconds=backward_seconds, ema_halflife_images=list(halflife),
                             denoised_mse=self._denoised_error(denoised, self.positions))
        self.summaries.append(done)
        self._print(done)
        return folder

    def _needs(self, folder: Path, positions: torch.Tensor) -> bool:
        """Whether any shard of ``folder`` for ``positions`` is missing or damaged (every rank)."""
        return any(read_shard(shard_path(folder, j), span, tuple(self.noisy.shape)) is None
                   for j, span in enumerate(shard_spans(positions, self.cfg.shard_size)))

    def _refresh(self, denoiser, chunk: torch.Tensor, folder: Path, j: int) -> torch.Tensor:
        """Online refresh ``j`` (0: the initial denoising of every noisy image)."""
        if denoiser is None and self._needs(folder, chunk):
            raise RuntimeError(f"{folder} is incomplete but training has already gone past it: "
                               f"the output folder was changed outside this run")
        cfg = self.cfg
        return denoise_into_shards(denoiser, self.noisy, chunk, folder, self.world,
                                   steps=cfg.denoise_steps, sampler=cfg.denoise_sampler,
                                   batch=cfg.denoise_batch, shard_size=cfg.shard_size,
                                   seed=mix(cfg.train.seed, _REFRESH_NOISE, j), clip=self.clip,
                                   progress=cfg.progress,
                                   desc="initial denoise" if j == 0 else f"refresh {j}")[0]


class _DropResumed(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("resumed from")


@contextlib.contextmanager
def _quiet_resume(quiet: bool):
    """Within: the training loop's "resumed from ..." line is dropped when ``quiet`` (an online
    segment continuing the one this process just trained is no resume for the user)."""
    if not quiet:
        yield
        return
    train_log, drop = logging.getLogger("symfast.train"), _DropResumed()
    train_log.addFilter(drop)
    try:
        yield
    finally:
        train_log.removeFilter(drop)


def refresh_positions(n: int, fraction: float, data_seed: int, j: int) -> torch.Tensor:
    """The positions (sorted) of the noisy set that online refresh ``j`` ≥ 1 denoises again:
    the next m = round(fraction·n) (at least 1) of a permutation seeded by ``data_seed``, taken
    cyclically, so every refresh renews the share asked for and each image is refreshed in turn.
    A pure function of its arguments: a resumed run refreshes the same images."""
    _checks.positive_int("n", n)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if isinstance(j, bool) or not isinstance(j, int) or j < 1:
        raise ValueError(f"j must be an int >= 1 (refresh 0 denoises every image), got {j!r}")
    m = max(1, min(n, round(fraction * n)))
    order = torch.randperm(n, generator=seeded_generator(data_seed + 1, "data_seed"))
    # laid out as the former ⌈1/fraction⌉ interleaved chunks (still a uniform permutation), so
    # for fraction = 1/k with k dividing n the sets are the old ones and an online run started
    # before finds its refresh shards valid on resume
    n_chunks = math.ceil(1 / fraction)
    order = torch.cat([order[c::n_chunks] for c in range(n_chunks)])
    start = (j - 1) * m % n
    return order[(start + torch.arange(m)) % n].sort().values


# Tags that keep the backward step's sampler noise apart from every other stream of the run.
_ROUND_NOISE, _REFRESH_NOISE = 0x5FBD0001, 0x5FBD0002


def _stage_seed(seed: int, stage: int) -> int:
    return mix(seed, stage)


def stage_ema_halflife_images(cfg: SFBDConfig, steps: int) -> tuple[float, ...]:
    """The EMA half-lives (images) of an SFBD fine-tuning stage of ``steps`` steps: the
    training config's, each capped at a tenth of the images the stage trains on. The stage's
    EMA restarts from the previous weights without ramp-up; at EDM's 500k-image default a
    1000-step round of 64 images left 92% of the EMA on those weights, and the EMA is what
    denoises, is evaluated and starts the next stage. Capped, the starting weights keep at
    most 0.5^10 ≈ 0.1% at the stage's end; stages of ≥ 10 half-lives (the paper's) are
    unchanged."""
    cap = steps * cfg.train.batch_size / 10
    return tuple(min(float(h), cap) for h in cfg.train.ema_halflife_images)


def _last_logged_loss(folder: Path) -> float | None:
    """The loss of the last row of ``folder``/metrics.csv that has one (None: none has)."""
    path = folder / "metrics.csv"
    if not path.exists():
        return None
    rows = csv.DictReader(path.read_text().splitlines())
    losses = [row["loss"] for row in rows if row.get("loss")]
    return float(losses[-1]) if losses else None
