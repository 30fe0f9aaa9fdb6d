"""symfast.train.train: the training loop, from one process to many (torchrun + DDP).

Determinism, and so a bit-exact resume, comes from deriving every random draw from counters
instead of carrying generator state (as EDM2 does):
- data order: epoch e is a permutation of the dataset seeded by (seed, e); step s takes the global
  positions [s·B, (s+1)·B) of the concatenated epochs, and rank r its r-th slice of them;
- σ, the noise ε, the augmentation's and the regulariser's group elements of the sample at
  position j of the global batch of step s: Philox keyed by (seed, s, j), so one process and N
  processes draw the same numbers for the same sample;
- torch's global generator (dropout, user code) is reseeded from (seed, step, rank) every step.
A checkpoint therefore needs only the step to restore the data position and every stream; it
also stores the weights, EMA copies, optimiser state and torch's RNG state.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import symfast
from symfast._ext import BusyCores
from symfast._io import atomic_write_bytes, atomic_write_text, fsync_dir, remove_stale_temporaries
from symfast.groups import get
from symfast.nn.regularizer import act_per_sample
from symfast.samplers._noise import philox_normal
from symfast.train import checkpoint
from symfast.train.build import (build_dataset, build_model, check_dataset, sampling_denoiser,
                                 training_denoiser)
from symfast.train.config import MODEL_FIELDS, TrainConfig, make_config
from symfast.train.distributed import World, setup
from symfast.train.ema import EMA

log = logging.getLogger("symfast.train")

_MASK64 = (1 << 64) - 1
# Philox lanes of the per-sample uniforms (counter c0); c3 = 1 keeps them apart from the noise.
_LANE_SIGMA, _LANE_AUGMENT, _LANE_REG = 0, 1, 2
# The loss is logged per σ-bin; bins hold equal shares of the training σ distribution.
_BIN_QUANTILES = (0.2, 0.4, 0.6, 0.8)


def sigma_bins(schedule) -> torch.Tensor:
    """The four σ edges of metrics.csv's five loss bins, each of training probability 1/5."""
    return schedule.training_levels(torch.tensor(_BIN_QUANTILES, dtype=torch.float64))[0]


def sigma_bin_index(sigma: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The bin [lo, hi) of each σ: an edge is σ(t = 200, 400, ...) on a DDPM schedule, and
    (lo, hi] put t = 200 in the first bin (201 timesteps of 1000 there, 199 in the last)."""
    return torch.bucketize(sigma.detach().to(edges.dtype), edges, right=True)
# Fields that may differ between a run and the checkpoint it resumes without a warning (steps
# too, unless the learning-rate schedule reads it: see _LR_READS_STEPS).
_FREE_ON_RESUME = ("steps", "out", "resume", "progress", "checkpoint_every", "keep", "sample_every",
                   "sample_n", "sample_steps", "log_every")
# The lr_schedule values whose learning rate at a step depends on ``steps`` (lr_at): changing
# steps on resume changes the learning rate of every remaining step.
_LR_READS_STEPS = ("cosine",)


class TrainingDiverged(RuntimeError):
    """Raised when the loss or the gradients stay non-finite for ``max_nonfinite`` steps, or at
    once when an optimiser step leaves the weights (or an EMA copy) non-finite."""


@dataclass
class TrainResult:
    """What a finished run leaves: its folder, its last step and checkpoint, the EMA networks."""

    run_dir: Path
    rank: int
    step: int
    nimg: int
    checkpoint: Path | None
    last_loss: float | None
    skipped_steps: int
    model: nn.Module
    ema_models: list[nn.Module]


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each value in turn)."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (int(v) & _MASK64)) & _MASK64
        z = (z + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then constant, cosine to 0 at ``steps``, or 1/√(step / warmup_steps)."""
    lr = cfg.lr
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(cfg.steps - cfg.warmup_steps, 1)
        return lr * 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))
    if cfg.lr_schedule == "inverse-sqrt":
        return lr / math.sqrt(max(step / max(cfg.warmup_steps, 1), 1.0))
    return lr


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused when every parameter allows it (floating point, on the CPU or CUDA): one
    kernel per step instead of a loop over the parameters. EquivariantUNet (32,64,64), 338k
    parameters in 100 tensors, on the development CPU: 9.4 ms per step with torch's default
    (a Python loop per tensor there), 6.1 ms foreach, 1.6 ms fused."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                             **({"fused": True} if fused else {"foreach": True}))


class DataOrder:
    """Which dataset rows a step's batch holds (see the module docstring)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(mix(self.seed, 0xDA7A, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=gen)
        return self._perm

    def indices(self, first: int, start: int, stop: int) -> torch.Tensor:
        """Dataset rows of global positions [first + start, first + stop)."""
        pos = first + start
        out = []
        while len(out) < stop - start:
            epoch, offset = divmod(pos, self.size)
            take = min(stop - start - len(out), self.size - offset)
            out.extend(self._permutation(epoch)[offset:offset + take].tolist())
            pos += take
        return torch.tensor(out, dtype=torch.int64)


def sample_normals(seed: int, step: int, streams: torch.Tensor, shape: tuple[int, ...],
                   device: torch.device) -> torch.Tensor:
    """Unit normals of ``shape`` (B, ...), sample b from the stream (seed, step, streams[b])."""
    key = torch.stack([torch.full_like(streams, seed), streams], dim=1).to(device)
    return philox_normal(key, step, shape)


def sample_uniforms(seed: int, step: int, streams: torch.Tensor, lanes: int) -> torch.Tensor:
    """(len(streams), lanes) float64 uniforms in (0, 1), one per (seed, step, stream, lane): the
    normal CDF of Philox normals drawn under a seed of their own (the fused op's kernel; the
    reference Philox in int64 torch ops took 1.6 ms for 64 x 3 values, ~1% of a training step)."""
    z = sample_normals(mix(seed, 0x5EED), step, streams, (len(streams), lanes), torch.device("cpu"))
    return torch.special.ndtr(z.double())


def _get_batch(dataset: Any, index: torch.Tensor) -> torch.Tensor:
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(index)
    return torch.stack([torch.as_tensor(dataset[i]) for i in index.tolist()])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MetricsLog:
    """metrics.csv, appended a row per log interval. On resume, rows after the checkpoint's step
    (logged by the killed run, logged again now) and a torn last line are dropped first."""

    def __init__(self, path: Path, columns: list[str], resume_step: int):
        self.path, self.columns = path, columns
        kept: list[dict[str, str]] = []
        if path.exists() and resume_step > 0:
            text = path.read_text()
            complete = text[:text.rfind("\n") + 1]  # a line without its newline is torn
            for row in csv.DictReader(io.StringIO(complete)):
                if row.get("step", "").isdigit() and int(row["step"]) <= resume_step:
                    kept.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, buf.getvalue())
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, columns, extrasaction="ignore", lineterminator="\n")

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def train(config: TrainConfig | dict | str | None = None, *, network: nn.Module | None = None,
          dataset: Any = None, device: str | torch.device | None = None, **overrides: Any) -> TrainResult:
    """Train a diffusion model; see :class:`TrainConfig` for every option.

    Under torchrun (``torchrun --nproc_per_node N -m symfast train ...``, or a script that calls
    this) every rank runs this function: the global ``batch_size`` is split over the ranks and
    gradients are averaged by DistributedDataParallel (gloo on CPU, NCCL on CUDA). Rank 0 writes
    checkpoints, metrics and samples; the others wait at a barrier.

    Args:
        config: a TrainConfig, a dict of its fields, or a JSON/TOML file; ``overrides`` are laid
            over it (``train(steps=100, out="runs/x")``).
        network: any nn.Module F(x, t) -> like x, instead of the config's model (the config's
            model is then "custom").
        dataset: images (N, C, H, W) in [-1, 1], instead of the config's data (config data
            "custom"): a floating tensor or numpy array, or a dataset (``len`` and ``[i]``, or
            ``get_batch(indices)``). A dataset with ``loss_weights(indices, step)`` (a (B,)
            tensor) weights each image's loss.
        device: "cpu", "cuda", ... (default: cuda:LOCAL_RANK when CUDA is available).

    Returns a :class:`TrainResult`. Raises :class:`TrainingDiverged` when the loss stays
    non-finite, or at once when a step leaves the weights non-finite (the last good checkpoint is
    kept and named; no checkpoint is ever written with non-finite weights).
    """
    if network is not None:
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        overrides["model"] = "custom"
    if dataset is not None:
        dataset = _as_dataset(dataset)
        overrides["data"] = "custom"
    cfg = make_config(config, **overrides)
    world = setup(device)
    try:
        return _Run(cfg, world, network, dataset).run()
    finally:
        world.close()


def _as_dataset(dataset: Any) -> Any:
    """A tensor or array of images as an ImageTensorDataset (its ``shape`` is the whole stack's,
    not one image's); any other dataset as it is."""
    if isinstance(dataset, np.ndarray):
        dataset = torch.from_numpy(dataset)
    if not isinstance(dataset, torch.Tensor):
        return dataset
    if dataset.dim() != 4 or not dataset.is_floating_point():
        raise ValueError(f"dataset as a tensor must be floating images (N, C, H, W), got "
                         f"{dataset.dtype} of shape {tuple(dataset.shape)}"
                         + (" (for one channel: dataset.unsqueeze(1))" if dataset.dim() == 3 else ""))
    from symfast.data.images import ImageTensorDataset
    return ImageTensorDataset(dataset, name="custom")


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of every floating tensor in ``tensors`` is finite: one foreach 2-norm
    (NaN or inf when a value is) and one sum per device, so one sync a call whatever the number
    of tensors (a max-abs norm, which cannot overflow, took 3x as long on the CPU). Only when
    that is not finite are the values looked at one by one: squares of finite weights over
    ~1e19 overflow too, and such weights are not yet non-finite."""
    floats = [t for t in tensors if t.is_floating_point()]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for norm in torch._foreach_norm(floats, 2.0) if floats else ():
        by_device.setdefault(norm.device, []).append(norm)
    if all(bool(torch.isfinite(torch.stack(norms).sum())) for norms in by_device.values()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in floats)


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """The gradients' total 2-norm, and the gradients scaled by min(clip / (norm + 1e-6), 1)
    unless ``clip`` is None: torch.nn.utils.clip_grad_norm_(foreach=True) op for op (the same
    bits) when every gradient shares one device and dtype, without its per-call grouping and
    generator walks (~1 ms a step for ~115 tensors on the CPU) and without the multiplication by 1
    that an infinite clip asks of it. Mixed devices or dtypes go to torch's own function."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    first = grads[0]
    if any(g.device != first.device or g.dtype != first.dtype for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, math.inf if clip is None else clip, foreach=True)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    if clip is not None:
        torch._foreach_mul_(grads, torch.clamp(float(clip) / (total + 1e-6), max=1.0))
    return total


class _Run:
    """One training run on one rank."""

    def __init__(self, cfg: TrainConfig, world: World, network: nn.Module | None, dataset: Any):
        self.cfg, self.world = cfg, world
        if cfg.batch_size % world.size:
            raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of "
                             f"processes ({world.size}): the global batch is split over the ranks")
        self.local_batch = cfg.batch_size // world.size
        self.dataset = dataset if dataset is not None else build_dataset(cfg)
        self.shape = check_dataset(cfg, self.dataset)
        cfg.data_channels = self.shape[0]  # recorded, so that load() rebuilds the same network
        self.run_dir = Path(cfg.out)
        resumed = self._resume_checkpoint()
        # the same initial weights on every rank, and in a resumed run before it loads
        torch.manual_seed(mix(cfg.seed, 0x1417))
        self.net = (network if network is not None else build_model(cfg, self.shape[0])).to(world.device)
        if resumed is None and cfg.init_from is not None:
            self._init_from(cfg.init_from)
        self.ema = EMA(self.net, cfg.ema_halflife_images, cfg.ema_rampup)
        self.optimizer = make_optimizer(self.net.parameters(), cfg)
        self.params = list(self.net.parameters())
        self.step, self.nimg, self.skipped = 0, 0, 0
        self.last_checkpoint: Path | None = None
        self.last_loss: float | None = None
        if resumed is not None:
            self._restore(resumed)
        train_net: Any = self.net
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel
            # Gradients live in the communication buckets (no copy in and out of them per step).
            train_net = DistributedDataParallel(
                self.net, device_ids=[world.device] if world.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        if cfg.compile:
            train_net = torch.compile(train_net)
        self.denoiser = training_denoiser(cfg, train_net)
        self.sampler = sampling_denoiser(cfg, self.ema.models[0])
        self.group = get(cfg.group) if cfg.group is not None else None
        self.schedule = self.denoiser.schedule
        edges = sigma_bins(self.schedule)
        self.bin_edges = edges.to(world.device)
        names = [0.0] + edges.tolist() + [math.inf]
        self.bin_names = [f"loss_sigma_{lo:.3g}-{hi:.3g}" for lo, hi in zip(names[:-1], names[1:])]
        self.order = DataOrder(len(self.dataset), cfg.seed)

    # ---- resume ----------------------------------------------------------------------------
    def _resume_checkpoint(self) -> checkpoint.Checkpoint | None:
        """Rank 0 chooses the checkpoint (or the error); every rank loads that same one."""
        cfg = self.cfg
        choice: dict[str, Any] = {"path": None, "error": None}
        if self.world.is_main:
            try:
                choice["path"] = self._choose_checkpoint()
            except (ValueError, checkpoint.CheckpointError) as exc:
                choice["error"] = f"{type(exc).__name__}: {exc}"
        choice = self.world.broadcast(choice)
        if choice["error"]:
            raise ValueError(choice["error"].split(": ", 1)[1])
        if choice["path"] is None:
            return None
        # (an exported checkpoint, or one lacking a counter or the optimiser state, is refused
        # here, and skipped by resume="auto" as a torn one)
        found = checkpoint.load(choice["path"], training=True)
        saved = TrainConfig.from_dict(found.state["config"])
        wrong = cfg.mismatches(saved)
        if len(cfg.ema_halflife_images) != len(saved.ema_halflife_images):
            # each half-life is one EMA copy of the network: their number is the checkpoint's
            wrong.append(f"ema_halflife_images: {len(cfg.ema_halflife_images)} EMA copies "
                         f"{cfg.ema_halflife_images!r} vs {len(saved.ema_halflife_images)} "
                         f"{saved.ema_halflife_images!r}")
        if wrong:
            raise ValueError(f"checkpoint {choice['path']} was trained with another config; "
                             f"mismatching fields (this run vs checkpoint): {'; '.join(wrong)}")
        mine, theirs = cfg.to_dict(), saved.to_dict()
        changed = [k for k in mine if k not in MODEL_FIELDS + _FREE_ON_RESUME and mine[k] != theirs[k]]
        if changed and self.world.is_main:
            log.warning("resuming %s with changed settings %s: the run will not match an "
                        "uninterrupted one", choice["path"], changed)
        if (cfg.steps != saved.steps and cfg.lr_schedule in _LR_READS_STEPS
                and found.step < cfg.steps and self.world.is_main):
            log.warning("resuming %s with steps=%d (it was trained with steps=%d) under "
                        "lr_schedule=%r, which decays to 0 at steps: the learning rate of every "
                        "remaining step changes, and the run will not match an uninterrupted one",
                        choice["path"], cfg.steps, saved.steps, cfg.lr_schedule)
        return found

    def _choose_checkpoint(self) -> str | None:
        cfg = self.cfg
        if cfg.resume == "none":
            if checkpoint.list_checkpoints(self.run_dir):
                raise ValueError(f"resume='none' but {checkpoint.checkpoint_dir(self.run_dir)} "
                                 f"already holds checkpoints: use resume='auto' to continue that "
                                 f"run, or another out folder")
            return None
        if cfg.resume == "auto":
            found = checkpoint.latest(self.run_dir, training=True)
            return str(found.path) if found is not None else None
        return str(checkpoint.resolve(cfg.resume, training=True).path)

    def _init_from(self, path: str) -> None:
        """The network's weights from the first EMA copy of another run's checkpoint."""
        try:
            found = checkpoint.resolve(path)
        except checkpoint.CheckpointError as exc:
            raise ValueError(f"init_from={path!r}: {exc}") from None
        wrong = self.cfg.mismatches(TrainConfig.from_dict(found.state["config"]))
        if wrong:
            raise ValueError(f"init_from={path!r} was trained with another config; mismatching "
                             f"fields (this run vs checkpoint): {'; '.join(wrong)}")
        checkpoint.load_weights(self.net, found, "ema.0.")
        if self.world.is_main:
            log.info("initialised from %s (EMA weights, step %d)", found.path, found.step)

    def _restore(self, ckpt: checkpoint.Checkpoint) -> None:
        """The checkpoint's weights, EMA copies, optimiser state and counters; ValueError naming
        the checkpoint when a tensor does not fit this run's model (as load() says it)."""
        t = ckpt.tensors
        checkpoint.load_weights(self.net, ckpt, "model.")
        for i, ema in enumerate(self.ema.models):
            checkpoint.load_weights(ema, ckpt, f"ema.{i}.")
        opt = ckpt.state["optimizer"]  # load(training=True) checked the fields resuming reads
        state: dict[int, dict[str, Any]] = {}
        for key, value in t.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                shape = tuple(self.params[int(index)].shape) if int(index) < len(self.params) else None
                # AdamW's moments have their parameter's shape (its step count is a scalar)
                if shape is None or (value.dim() and tuple(value.shape) != shape):
                    raise ValueError(f"checkpoint {ckpt.path} does not fit the model: optimiser "
                                     f"tensor {key} has shape {tuple(value.shape)}, parameter "
                                     f"{index} {shape or 'does not exist'}")
                state.setdefault(int(index), {})[name] = value
        for index, scalars in opt["scalars"].items():
            state.setdefault(int(index), {}).update(scalars)
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in opt["param_groups"]]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        # the checkpoint's groups hold the settings it was trained with; a resume that changes
        # them (the config warns) trains with the new ones, as it does with a new lr
        for group in self.optimizer.param_groups:
            group["betas"], group["weight_decay"] = tuple(self.cfg.adam_betas), self.cfg.weight_decay
        if "rng.torch_cpu" in t:
            torch.set_rng_state(t["rng.torch_cpu"])
        # rank 0 carries the interval's sums on (the log adds every rank's)
        self.resumed_sums = t.get("log.interval_sums") if self.world.is_main else None
        self.step = ckpt.step
        self.nimg = int(ckpt.state["nimg"])
        self.skipped = int(ckpt.state["nonfinite_skipped"])
        # a divergence message names last_checkpoint as the one to go back to: it must be good
        # (a checkpoint of an older symfast could hold the NaN weights of a diverged run)
        if not all_finite(self.params + self.ema.tensors()):
            raise ValueError(f"checkpoint {ckpt.path} holds non-finite weights (written by a run "
                             f"that diverged): resume from an older checkpoint")
        self.last_checkpoint = ckpt.path
        if self.world.is_main:
            log.info("resumed from %s (step %d, %d images)", ckpt.path, self.step, self.nimg)

    def _checkpoint_payload(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"model.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update(self.ema.state_tensors())
        opt = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, entries in opt["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{name}"] = value
                else:
                    scalars.setdefault(str(index), {})[name] = value
        tensors["rng.torch_cpu"] = torch.get_rng_state()
        # from the images seen: step · batch size is that only while the batch size never changed
        epoch, offset = divmod(self.nimg, len(self.dataset))
        state = {
            "step": self.step, "nimg": self.nimg, "nonfinite_skipped": self.skipped,
            "data": {"epoch": epoch, "offset": offset, "dataset_size": len(self.dataset),
                     "global_batch": self.cfg.batch_size},
            "rng": {"seed": self.cfg.seed, "scheme": "philox(seed, step, global sample position) "
                    "for data noise, σ and group elements; torch reseeded per (seed, step, rank)"},
            "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
            "lr": lr_at(self.cfg, max(self.step - 1, 0)),
            "world_size": self.world.size,
            "config": self.cfg.to_dict(),
            "symfast_version": symfast.__version__,
            "torch_version": torch.__version__,
        }
        return tensors, state

    def _save_checkpoint(self) -> None:
        # every step checks the weights, not the EMA copies (as many tensors again): a lerp
        # between huge finite values can still overflow, and a checkpoint must never hold
        # non-finite weights. The same on every rank (the weights are), so all ranks stop.
        if not all_finite(self.ema.tensors()):
            raise self._diverged(f"an EMA copy of the weights turned non-finite by step {self.step}")
        # the log interval's sums so far (every rank's), so a resumed run's next metrics row
        # covers the whole interval as the uninterrupted run's does
        acc = getattr(self, "acc", None)
        if acc is not None:
            acc = acc.clone()
            self.world.all_reduce_sum(acc)
        if self.world.is_main:
            tensors, state = self._checkpoint_payload()
            if acc is not None:
                tensors["log.interval_sums"] = acc.cpu()
            checkpoint.save(self.run_dir, self.step, tensors, state, keep=self.cfg.keep)
        self.world.barrier()
        self.last_checkpoint = checkpoint.path_for(self.run_dir, self.step)

    # ---- one step --------------------------------------------------------------------------
    def _batch(self, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """This rank's images and the loss's random draws for step ``step``."""
        cfg, device = self.cfg, self.world.device
        start = self.world.rank * self.local_batch
        streams = torch.arange(start, start + self.local_batch, dtype=torch.int64)
        # the images seen so far, not step·batch_size: a resume with another batch size goes on
        # from where the data order stopped (step·batch_size skipped or repeated images)
        index = self.order.indices(self.nimg, start, start + self.local_batch)
        x0 = _get_batch(self.dataset, index).to(device=device, dtype=torch.float32)
        u = sample_uniforms(cfg.seed, step, streams, 3)
        sigma, t = self.schedule.training_levels(u[:, _LANE_SIGMA].to(device))
        noise = sample_normals(cfg.seed, step, streams, tuple(x0.shape), device)
        extra: dict[str, Any] = {}
        if cfg.equivariance == "augment":
            x0 = act_per_sample(x0, (u[:, _LANE_AUGMENT] * len(self.group)).long(), self.group)
        if cfg.equivariance == "reg" and cfg.reg_weight > 0:
            extra = {"reg_weight": cfg.reg_weight, "reg_target": self.ema.models[0],
                     "reg_elements": (u[:, _LANE_REG] * len(self.group)).long()}
        if hasattr(self.dataset, "loss_weights"):  # per-image weights (online SFBD's ramp)
            extra["weights"] = self.dataset.loss_weights(index, step).to(device=device, dtype=torch.float32)
        return x0, dict(sigma=sigma, noise=noise, t=t, **extra)

    def _train_step(self, step: int):
        cfg = self.cfg
        # torch.manual_seed also (lazily) reseeds every accelerator generator: 0.4 ms per call
        # on the CPU, against 2 us for the default generator alone.
        rng_seed = mix(cfg.seed, step, self.world.rank)
        torch.default_generator.manual_seed(rng_seed)
        if self.world.device.type == "cuda":
            torch.cuda.manual_seed(rng_seed)
        x0, draws = self._batch(step)
        weights = draws.pop("weights", None)
        with torch.autocast(self.world.device.type, dtype=torch.bfloat16,
                            enabled=cfg.precision == "bf16"):
            terms = self.denoiser.loss(x0, reduction="none", **draws)
        loss = terms.total.mean() if weights is None else (terms.total * weights).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return terms, clip_grad_norm_(self.params, cfg.grad_clip)

    # ---- the loop --------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if self.step > self.cfg.steps:
            # config.json would claim the shorter run, and there is nothing to train
            if self.world.is_main:
                log.warning("%s is already at step %d, past steps=%d: nothing trained, and "
                            "config.json, metrics and checkpoints are left as they are (give "
                            "steps > %d to train on)", self.last_checkpoint, self.step,
                            self.cfg.steps, self.step)
        else:
            self.open_outputs()
            try:
                while self.step < self.cfg.steps:
                    self.iteration()
            finally:
                self.close_outputs()
        return TrainResult(self.run_dir, self.world.rank, self.step, self.nimg, self.last_checkpoint,
                           self.last_loss, self.skipped, self.net, self.ema.models)

    def open_outputs(self) -> None:
        """Rank 0: the run folder, config.json, metrics.csv (repaired on resume), TensorBoard;
        every rank: the progress bar and the log interval's accumulators."""
        cfg, world = self.cfg, self.world
        self.metrics = self.writer = None
        columns = (["step", "nimg", "loss"] + self.bin_names
                   + (["reg_loss"] if cfg.equivariance == "reg" else [])
                   + ["lr", "grad_norm", "images_per_s", "peak_memory_mb", "skipped_steps"])
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for leftover in checkpoint.clean_leftovers(self.run_dir):
                log.warning("removed %s, left by an interrupted checkpoint write", leftover)
            samples = self.run_dir / "samples"
            if samples.is_dir():
                for leftover in remove_stale_temporaries(samples):
                    log.warning("removed %s, left by an interrupted sample grid write", leftover)
            self._set_aside_later_steps(samples)
            atomic_write_text(self.run_dir / "config.json", _json(cfg.to_dict()))
            self.metrics = MetricsLog(self.run_dir / "metrics.csv", columns, self.step)
            self.writer = _tensorboard(self.run_dir, self.step)
        world.barrier()
        from tqdm.auto import tqdm
        self.bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                        disable=not (cfg.progress and world.is_main), dynamic_ncols=True)
        # sums over a log interval: loss, count, reg, grad norm, then per bin (loss, count)
        self.acc = torch.zeros(4 + 2 * len(self.bin_names), dtype=torch.float64, device=world.device)
        resumed = getattr(self, "resumed_sums", None)
        if resumed is not None and resumed.shape == self.acc.shape:
            self.acc.copy_(resumed)
        self.consecutive_bad, self.last_loss = 0, None
        self.tick, self.tick_nimg = time.perf_counter(), self.nimg
        self.busy_cores = BusyCores() if world.device.type == "cpu" and world.is_main else None

    def _set_aside_later_steps(self, samples: Path) -> None:
        """Rank 0, before anything is written: a run that continues from step s (an older
        checkpoint given as resume, or the newest one that verifies) branches there, so the
        checkpoints of later steps and their sample grids are moved into one folder named for the
        branch, never deleted, with a copy of metrics.csv (which then drops its rows after s).
        The checkpoints move last: a run killed before that sets them aside again when rerun."""
        if not checkpoint.later_than(self.run_dir, self.step):
            return
        folder = checkpoint.branch_folder(self.run_dir, self.step)
        folder.mkdir()
        metrics = self.run_dir / "metrics.csv"
        if metrics.is_file():
            atomic_write_bytes(folder / "metrics.csv", metrics.read_bytes())
        grids = sorted(samples.glob("step-*.png")) if samples.is_dir() else []
        later = [g for g in grids if g.stem[5:].isdigit() and int(g.stem[5:]) > self.step]
        if later:
            (folder / "samples").mkdir()
            for grid in later:
                grid.replace(folder / "samples" / grid.name)
            fsync_dir(folder / "samples")
            fsync_dir(samples)
        moved = checkpoint.set_aside(self.run_dir, self.step, folder)
        log.warning("this run continues from step %d: moved the checkpoint(s) of later steps "
                    "(%s) and %d sample grid(s) aside into %s, with a copy of metrics.csv, so that "
                    "none is taken for this run's newest; delete that folder once you no longer "
                    "need it", self.step, ", ".join(p.name for p in moved), len(later), folder)

    def close_outputs(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.writer is not None:
            self.writer.close()

    def iteration(self) -> None:
        """One optimiser step and what the loop does around it: EMA, metrics, and the log row,
        checkpoint and samples when they are due."""
        cfg = self.cfg
        self.world.check_launcher()
        terms, grad_norm = self._train_step(self.step)
        if torch.isfinite(grad_norm):
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(cfg, self.step)
            self.optimizer.step()
            # finite gradients can still move a weight to inf or NaN (a huge learning rate):
            # stop before the EMA, a checkpoint or the next step takes them in. One foreach
            # norm and one sync: on the development CPU 0.5 ms of a 35 ms step of the tests'
            # 8x8 (8,16) UNet, 1 ms of a 230 ms step of the default model.
            if not all_finite(self.params):
                raise self._diverged(f"the weights turned non-finite in the optimiser step of "
                                     f"step {self.step}")
            self.ema.update(self.nimg, cfg.batch_size)
            self.consecutive_bad = 0
            self._accumulate(self.acc, terms, grad_norm)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.consecutive_bad += 1
            if self.consecutive_bad >= cfg.max_nonfinite:
                raise self._diverged(f"the loss or its gradients were non-finite for "
                                     f"{self.consecutive_bad} consecutive steps (step {self.step})")
        self.step += 1
        self.nimg += cfg.batch_size
        self.bar.update(1)
        done = self.step == cfg.steps
        if self.step % cfg.log_every == 0 or done:
            self._log()
        # the grid before the checkpoint: a run killed in between redoes the step and writes
        # the grid again, where the other order would resume past a step whose grid was lost
        if cfg.sample_every and (self.step % cfg.sample_every == 0 or done):
            self._write_samples()
        if self.step % cfg.checkpoint_every == 0 or done:
            self._save_checkpoint()

    def _diverged(self, what: str) -> TrainingDiverged:
        """The error that stops a diverged run: what went wrong, the newest checkpoint (its
        weights are finite: none is written otherwise), and what to change in this config."""
        cfg = self.cfg
        if self.last_checkpoint is not None:
            where = f"The last good checkpoint is {self.last_checkpoint}"
            then = "then resume from it"
        else:
            where = "No checkpoint was written yet (there is no last good checkpoint)"
            then = "then start again"
        change = f"lower lr (now {cfg.lr})" + (
            " or set grad_clip" if cfg.grad_clip is None
            else f" (grad_clip={cfg.grad_clip} already clips the gradients)")
        return TrainingDiverged(f"{what}: training stopped. {where}; {change}, {then}")

    def _log(self) -> None:
        now = time.perf_counter()
        row = self._log_row(self.acc, (self.nimg - self.tick_nimg) / max(now - self.tick, 1e-9))
        self.tick, self.tick_nimg = now, self.nimg
        self.acc.zero_()
        if self.busy_cores is not None and (advice := self.busy_cores.check()):
            log.warning("%s", advice)
        if row.get("loss") is not None:
            self.last_loss = row["loss"]
        if self.metrics is not None:
            self.metrics.write(row)
            self.bar.set_postfix(loss=row["loss"], img_s=f"{row['images_per_s']:.0f}")
            if self.writer is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, float) and math.isfinite(v):
                        self.writer.add_scalar(k, v, self.step)

    def _accumulate(self, acc: torch.Tensor, terms, grad_norm: torch.Tensor) -> None:
        dsm = terms.dsm.detach().double()
        acc[0] += terms.total.detach().double().sum()
        acc[1] += dsm.numel()
        if terms.reg is not None:
            acc[2] += terms.reg.detach().double().sum()
        if self.world.is_main:  # the same on every rank: counted once, so a checkpoint's sums
            acc[3] += grad_norm.detach().double()  # hold across a resume with another world size
        which = sigma_bin_index(terms.sigma, self.bin_edges)
        nbins = len(self.bin_names)
        acc[4:4 + nbins] += torch.zeros(nbins, dtype=torch.float64, device=dsm.device).index_add_(0, which, dsm)
        acc[4 + nbins:] += torch.bincount(which, minlength=nbins).double()

    def _log_row(self, acc: torch.Tensor, images_per_s: float) -> dict[str, Any]:
        self.world.all_reduce_sum(acc)
        n, nbins = float(acc[1]), len(self.bin_names)
        steps = n / self.cfg.batch_size  # finite steps in the interval
        row: dict[str, Any] = {"step": self.step, "nimg": self.nimg,
                               "loss": float(acc[0]) / n if n else None,
                               "lr": lr_at(self.cfg, self.step - 1),
                               "grad_norm": float(acc[3]) / steps if steps else None,
                               "images_per_s": images_per_s,
                               "peak_memory_mb": _peak_memory_mb(self.world.device),
                               "skipped_steps": self.skipped}
        if self.cfg.equivariance == "reg":
            row["reg_loss"] = float(acc[2]) / n if n else None
        for i, name in enumerate(self.bin_names):
            count = float(acc[4 + nbins + i])
            row[name] = float(acc[4 + i]) / count if count else None
        return row

    def _write_samples(self) -> None:
        if self.world.is_main:
            from symfast.data.images import save_image_grid
            from symfast.samplers import sample
            shape = (self.cfg.sample_n,) + tuple(self.shape)
            x = sample(self.sampler, shape, sampler="heun", steps=self.cfg.sample_steps, seed=0,
                       progress=False, device=self.world.device)
            save_image_grid(x.clamp(-1, 1).cpu(), self.run_dir / "samples" / f"step-{self.step:09d}.png")
        self.world.barrier()


def _json(values: dict[str, Any]) -> str:
    import json
    return json.dumps(values, indent=1, sort_keys=True)


def _tensorboard(run_dir: Path, step: int):
    """A SummaryWriter when tensorboard is installed (events purged past ``step`` on resume)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=step if step > 0 else None)
