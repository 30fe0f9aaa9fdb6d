"""The training configuration: one dataclass, checked in full before any work starts.

A config comes from keyword arguments, a dict, or a JSON/TOML file (``load_config_file``), with
command-line flags laid over it. It is written to ``OUT/config.json`` and into every checkpoint,
so a run can be resumed, and a checkpoint loaded, without the flags that made it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from symfast.ops import _checks

MODELS = ("unet", "equivariant-unet", "diffusers-unet", "custom")
EQUIVARIANCE = ("none", "augment", "wt", "fa", "reg")
PREDICTIONS = ("edm", "eps", "v", "x0")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine", "inverse-sqrt")
BUILTIN_DATA = ("digits", "digits-d4", "gmm-d4")
FLOAT32_MAX = 3.4028234663852886e38

# What a checkpoint's weights and objective depend on: loading into a config that differs in any
# of these is refused, naming the fields. The rest (steps, lr, logging) may change on resume.
MODEL_FIELDS = ("data_channels", "image_size", "model", "channels", "attention_levels", "heads",
                "group", "equivariance", "fa_train", "prediction", "sigma_data")


@dataclass
class TrainConfig:
    """Everything a training run needs; see ``symfast train --help`` for each field's flag.

    Data: ``data`` is "digits" (scikit-learn's 8×8 digits resized to ``image_size``),
    "digits-d4" (every digit under every D4 element: an exactly D4-invariant set), "gmm-d4" (a
    D4-invariant Gaussian mixture with an exact score) or a folder of PNG/JPEG images.
    Model: "unet", "equivariant-unet" (tied convolutions, needs ``group``), "diffusers-unet"
    (diffusers' UNet2DModel), or "custom" (an nn.Module passed to ``train(network=...)``).
    Equivariance: "none"; "augment" (a random group element per training image); "wt" (an
    EquivariantUNet, one call per step); "fa" (frame averaging at sampling; in training too with
    ``fa_train``); "reg" (denoising loss + ``reg_weight``·equivariance loss against the EMA).
    Fine-tuning: ``init_from`` (a checkpoint or run folder) starts a new run from that run's first
    EMA weights, with a fresh optimiser and the EMA restarted at them (EDM's ``--transfer``; set
    ``ema_rampup=None`` as it does). A run that resumes from its own checkpoint ignores it.
    """

    # data
    data: str = "digits"
    image_size: int = 16
    data_channels: int | None = None
    dataset_size: int = 4096
    # model
    model: str | None = None
    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[int, ...] | None = None
    heads: int = 4
    group: str | None = None
    equivariance: str = "none"
    fa_train: bool = False
    reg_weight: float = 1.0
    prediction: str = "edm"
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    # optimisation
    batch_size: int = 64
    steps: int = 2000
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    grad_clip: float | None = 1.0
    max_nonfinite: int = 20
    ema_halflife_images: tuple[float, ...] = (500_000.0,)
    ema_rampup: float | None = 0.05
    precision: str = "fp32"
    compile: bool = False
    seed: int = 0
    # output
    out: str = "runs/train"
    checkpoint_every: int = 500
    keep: int = 3
    resume: str = "auto"
    init_from: str | None = None
    sample_every: int = 0
    sample_n: int = 16
    sample_steps: int = 18
    log_every: int = 10
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("channels", "attention_levels", "adam_betas", "ema_halflife_images"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = (value,)
            if isinstance(value, str) and value.strip().lower() != "none":
                kind = float if name in ("adam_betas", "ema_halflife_images") else int
                try:
                    value = tuple(kind(v) for v in value.split(",") if v.strip())
                except ValueError:
                    raise ValueError(f"{name} must be a comma-separated list of "
                                     f"{'numbers' if kind is float else 'ints'}, got {value!r}") from None
            if isinstance(value, list):
                value = tuple(value)
            setattr(self, name, value)
        none_to_none(self)
        if self.group is None and self.equivariance != "none":
            self.group = "d4"
        if self.model is None:
            self.model = "equivariant-unet" if self.equivariance == "wt" else "unet"
        if self.data_channels is None and self.data in BUILTIN_DATA:
            self.data_channels = 1

    # ---- checks ----------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise ValueError/TypeError naming the first bad field; returns self."""
        check_field_types(self)

        def positive_int(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
                need = "a non-negative" if allow_zero else "a positive"
                raise ValueError(f"{name} must be {need} int, got {value!r}")

        def choice(name: str, options: tuple) -> None:
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        for name in ("image_size", "heads", "batch_size", "steps", "checkpoint_every", "keep",
                     "sample_n", "sample_steps", "log_every", "dataset_size", "max_nonfinite"):
            positive_int(name)
        for name in ("warmup_steps", "sample_every"):
            positive_int(name, allow_zero=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2^63), got {self.seed!r}")
        choice("model", MODELS)
        choice("equivariance", EQUIVARIANCE)
        choice("prediction", PREDICTIONS)
        choice("precision", PRECISIONS)
        choice("lr_schedule", LR_SCHEDULES)
        if not self.channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                                        for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {self.channels!r}")
        if self.data_channels is not None and self.data_channels not in (1, 3):
            raise ValueError(f"data_channels must be 1 or 3, got {self.data_channels!r}")
        multiple = 2 ** (len(self.channels) - 1)
        if self.model in ("unet", "equivariant-unet", "diffusers-unet") and self.image_size % multiple:
            raise ValueError(f"image_size={self.image_size} cannot be pooled {len(self.channels) - 1} "
                             f"times by a UNet with channels={list(self.channels)}: it must be "
                             f"divisible by {multiple}")
        if self.model == "diffusers-unet":
            groups = min(8, *self.channels)  # build.py's norm_num_groups
            if any(c % groups for c in self.channels):
                raise ValueError(f"channels={list(self.channels)} must each be divisible by {groups} "
                                 f"for model='diffusers-unet' (its GroupNorm layers have "
                                 f"min(8, *channels) = {groups} groups)")
        if self.group is not None:
            from symfast.groups import get
            get(self.group)  # names the group in its error when unknown
            if self.equivariance == "none":
                raise ValueError(f"group={self.group!r} needs equivariance= one of "
                                 f"{EQUIVARIANCE[1:]} (it says how the group is used)")
        if self.equivariance == "wt" and self.model not in ("equivariant-unet", "custom"):
            raise ValueError(f"equivariance='wt' (weight tying) needs model='equivariant-unet' (or "
                             f"an equivariant custom model), got model={self.model!r}")
        if self.model == "equivariant-unet" and self.equivariance not in ("wt",):
            raise ValueError(f"model='equivariant-unet' is equivariance='wt'; got "
                             f"equivariance={self.equivariance!r}")
        if self.fa_train and self.equivariance != "fa":
            raise ValueError("fa_train=True needs equivariance='fa'")
        for name in ("lr", "sigma_data", "p_std"):
            _checks.finite_number(name, getattr(self, name), positive=True)
        # the optimiser steps fp32 weights: a larger lr is inf there, and the first step made
        # every weight inf or NaN
        if self.lr > FLOAT32_MAX:
            raise ValueError(f"lr must be at most {FLOAT32_MAX:.4g} (the largest float32), got "
                             f"{self.lr!r}")
        if not math.isfinite(self.p_mean):
            raise ValueError(f"p_mean must be finite, got {self.p_mean!r}")
        for name in ("weight_decay", "reg_weight"):
            _checks.finite_number(name, getattr(self, name), positive=False)
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if not self.ema_halflife_images or not all(h > 0 for h in self.ema_halflife_images):
            raise ValueError(f"ema_halflife_images must be positive numbers, got "
                             f"{self.ema_halflife_images!r}")
        if self.ema_rampup is not None and not self.ema_rampup > 0:
            raise ValueError(f"ema_rampup must be > 0 or None, got {self.ema_rampup!r}")
        if self.attention_levels is not None and any(
                not 0 <= a < len(self.channels) for a in self.attention_levels):
            raise ValueError(f"attention_levels {self.attention_levels} must lie in "
                             f"[0, {len(self.channels)})")
        smallest = builtin_data_min_size(self.data)
        if smallest is not None and self.image_size < smallest:
            raise ValueError(f"image_size must be >= {smallest} for data={self.data!r}, got "
                             f"{self.image_size}")
        if self.data not in BUILTIN_DATA + ("custom",) and not Path(self.data).is_dir():
            raise ValueError(f"data must be one of {BUILTIN_DATA}, an image folder, or 'custom' "
                             f"(a dataset passed to train()); {self.data!r} is none of these")
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise TypeError(f"init_from must be a checkpoint path (str) or None, got "
                            f"{type(self.init_from).__name__}")
        # options that only one setting reads: a value away from the default elsewhere was
        # silently a different run from the one asked for (as fa_train is refused above)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.reg_weight != defaults["reg_weight"] and self.equivariance != "reg":
            raise ValueError(f"reg_weight={self.reg_weight!r} needs equivariance='reg' (the "
                             f"regulariser's weight), got equivariance={self.equivariance!r}")
        # (a dataset passed in, data="custom", is how SFBD's stages run: they keep the gmm-d4
        # run's own value)
        if self.dataset_size != defaults["dataset_size"] and self.data not in ("gmm-d4", "custom"):
            raise ValueError(f"dataset_size={self.dataset_size!r} is the number of images drawn from "
                             f"data='gmm-d4'; data={self.data!r} has its own size")
        check_out_folder(self.out)
        if self.resume not in ("auto", "none") and not Path(self.resume).exists():
            raise ValueError(f"resume={self.resume!r}: no such checkpoint (give 'auto', 'none' or "
                             f"the path of a checkpoint or run folder)")
        return self

    def schedule(self):
        """The noise schedule the prediction type trains on: EDM's for "edm", DDPM's otherwise."""
        from symfast.schedules import DDPMSchedule, EDMSchedule
        if self.prediction == "edm":
            return EDMSchedule(sigma_data=self.sigma_data, p_mean=self.p_mean, p_std=self.p_std)
        return DDPMSchedule()

    # ---- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    def mismatches(self, other: "TrainConfig") -> list[str]:
        """The MODEL_FIELDS in which the two configs differ, as 'field: self vs other'. The
        attention levels are compared as built (None is the lowest level: [1] for two levels)."""
        mine, theirs = self.to_dict(), other.to_dict()
        for values in (mine, theirs):
            if values["attention_levels"] is None:
                values["attention_levels"] = [len(values["channels"]) - 1]
        return [f"{name}: {mine[name]!r} vs {theirs[name]!r}" for name in MODEL_FIELDS
                if mine[name] != theirs[name]]


def builtin_data_min_size(data: str) -> int | None:
    """The smallest image_size the built-in data ``data`` can be made at (None: any, or not
    built in), as symfast.data.images checks it (under the name of its own argument, size)."""
    from symfast.data import images
    return {"digits": images.DIGITS_MIN_SIZE, "digits-d4": images.DIGITS_MIN_SIZE,
            "gmm-d4": images.GAUSSIAN_MIXTURE_MIN_SIZE}.get(data)


def check_out_folder(out: str) -> None:
    """ValueError unless ``out`` is a folder or can become one (a file there would fail the
    first mkdir with a bare FileExistsError)."""
    if isinstance(out, str) and not out.strip():
        # Path("") is the current folder: the run's files went in among whatever is there
        raise ValueError(f"out={out!r} is empty; give the folder for the run")
    path = Path(out)
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise ValueError(f"out={out!r}: {str(part)!r} is a file; out must be a folder for the run")
            return


def none_to_none(config: Any) -> None:
    """The string "none" (any case, as the command line's help and config files write it) is
    None for every field that may be None."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if (isinstance(value, str) and value.strip().lower() == "none"
                and type(None) in typing.get_args(hints[f.name])):
            setattr(config, f.name, None)


def check_field_types(config: Any, skip: tuple[str, ...] = ()) -> None:
    """TypeError naming the first field of the dataclass ``config`` whose value does not have
    its annotated type (a number for a float, true/false for a bool, ...)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name not in skip and not _fits(value, hints[f.name]):
            raise TypeError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    names = {type(None): "None", bool: "true or false", int: "an int", float: "a number",
             str: "a string"}
    return names.get(hint, f"a {getattr(origin or hint, '__name__', hint)}")


# Tables a config file may hold beside [train], read by other commands: symfast sfbd's [sfbd].
_OTHER_TABLES = ("sfbd",)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's fields: JSON (``.json``) or TOML (``.toml``), flat or under [train]. With
    a [train] table, any other top-level key but an [sfbd] table is refused, naming it (in TOML a
    key above [train] is top-level, and was easy to take for a training field)."""
    values = read_config_file(path)
    if "train" not in values:
        return values
    train = values["train"]
    if not isinstance(train, dict):
        raise ValueError(f"config file {str(path)!r}: train must be a table of training fields, "
                         f"got {train!r}")
    outside = sorted(k for k in values if k != "train"
                     and not (k in _OTHER_TABLES and isinstance(values[k], dict)))
    if outside:
        raise ValueError(f"config file {str(path)!r} has a [train] table and top-level key(s) "
                         f"{outside} outside it: put training fields under [train] (in TOML, "
                         f"below the [train] line) or write the file without a [train] table; "
                         f"the only other table read is [sfbd] (symfast sfbd's fields)")
    return train


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level table of a JSON (``.json``) or TOML (``.toml``) file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"config file {str(path)!r}: expected a .json or .toml file")
    import tomllib
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {str(path)!r} is not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {str(path)!r} must hold a table of fields")
    return values


def make_config(config: TrainConfig | dict[str, Any] | str | os.PathLike | None = None,
                **overrides: Any) -> TrainConfig:
    """A checked TrainConfig from a config, a dict or a file, with ``overrides`` laid over it."""
    values = config_values(config, TrainConfig, load_config_file, overrides)
    return TrainConfig.from_dict(values).validate()


def config_values(config: Any, kind: type, read_file, overrides: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``config`` (None, a ``kind`` instance, a dict, or a file ``read_file``
    reads), names with '-' as '_', and ``overrides`` laid over them."""
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, kind):
        values = config.to_dict()
    elif isinstance(config, dict):
        values = dict(config)
    elif isinstance(config, (str, os.PathLike)):
        values = read_file(config)
    else:
        raise TypeError(f"config must be a {kind.__name__}, a dict or a file path, got "
                        f"{type(config).__name__}")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    values.update({k.replace("-", "_"): v for k, v in overrides.items()})
    return values
