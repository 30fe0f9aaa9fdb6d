"""From a TrainConfig to the objects a run uses: the dataset, the network, and the two denoisers
(the one trained, and the one sampling uses)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from symfast.denoiser import Denoiser
from symfast.train.config import TrainConfig

# The Gaussian mixture and its samples are the task, not the run: fixed, so that runs with
# different seeds learn the same distribution.
_GMM_SEED = 0


def build_dataset(cfg: TrainConfig):
    """The training images (an ImageTensorDataset, (N, C, H, W) in [-1, 1])."""
    from symfast.data import images

    if cfg.data == "digits":
        return images.digits(cfg.image_size)
    if cfg.data == "digits-d4":
        return images.orbit_augmented(images.digits(cfg.image_size), "d4")
    if cfg.data == "gmm-d4":
        mixture = images.gaussian_mixture("d4", size=cfg.image_size, channels=cfg.data_channels or 1,
                                          seed=_GMM_SEED)
        return mixture.dataset(cfg.dataset_size, seed=_GMM_SEED)
    if cfg.data == "custom":
        raise ValueError("data='custom' needs the dataset passed in: train(dataset=...) or "
                         "symfast.train.sfbd.run(dataset=...)")
    return images.image_folder(cfg.data, cfg.image_size, cfg.data_channels or 3)


def pixel_range(cfg: TrainConfig) -> tuple[float, float] | None:
    """The value range of the images ``build_dataset`` makes: [-1, 1] for digits and image
    folders; None for the Gaussian mixture (unbounded) and a dataset passed in (unknown)."""
    return None if cfg.data in ("gmm-d4", "custom") else (-1.0, 1.0)


def dataset_shape(dataset: Any) -> tuple[int, ...]:
    """(C, H, W) of one training image."""
    shape = getattr(dataset, "shape", None)
    if shape is None and not hasattr(dataset, "__getitem__") and hasattr(dataset, "get_batch"):
        shape = tuple(dataset.get_batch(torch.zeros(1, dtype=torch.int64)).shape[1:])
    if shape is None:
        shape = tuple(dataset[0].shape)
    return tuple(int(s) for s in shape)


def check_dataset(cfg: TrainConfig, dataset: Any) -> tuple[int, ...]:
    """The dataset's image shape, after checking it against the config: ValueError naming what
    does not fit."""
    if len(dataset) < 1:
        raise ValueError("the dataset is empty")
    shape = dataset_shape(dataset)
    if len(shape) != 3:
        raise ValueError(f"dataset images must be (C, H, W), got shape {shape}")
    c, h, w = shape
    if cfg.data_channels is not None and c != cfg.data_channels:
        raise ValueError(f"the dataset has {c} channels but data_channels={cfg.data_channels}")
    if c not in (1, 3):
        # grids, loading and sampling read grey or RGB images: the run failed only at its end
        raise ValueError(f"the dataset's images have {c} channels; data_channels must be 1 or 3")
    if cfg.group is not None:
        from symfast.groups import get
        get(cfg.group).check_input(torch.empty(1, *shape), "dataset images")
    # for a custom network too: config.json's image_size is the size load() and sampling use
    if (h, w) != (cfg.image_size, cfg.image_size):
        raise ValueError(f"the dataset's images are {h}x{w} but image_size={cfg.image_size}")
    images = getattr(dataset, "images", None)
    # a dataset held in one tensor is checked whole (a pass over memory); others image by image
    # would cost an epoch, and their non-finite steps are skipped and counted
    if isinstance(images, torch.Tensor) and not bool(torch.isfinite(images).all()):
        raise ValueError(f"the dataset holds non-finite values (NaN or inf) in "
                         f"{int((~torch.isfinite(images)).flatten(1).any(1).sum())} of its "
                         f"{len(images)} images (every step whose batch holds one would be "
                         f"skipped)")
    if cfg.model != "custom":
        multiple = 2 ** (len(cfg.channels) - 1)
        if h % multiple or w % multiple:
            raise ValueError(f"images of {h}x{w} cannot be pooled by a UNet with channels="
                             f"{list(cfg.channels)}: H and W must be divisible by {multiple}")
    return shape


def build_model(cfg: TrainConfig, in_channels: int) -> nn.Module:
    """The network F(x, t) the config names, with in and out channels ``in_channels``."""
    from symfast.nn import EquivariantUNet, UNet

    if cfg.model == "unet":
        return UNet(in_channels, in_channels, cfg.channels, cfg.attention_levels, cfg.heads)
    if cfg.model == "equivariant-unet":
        return EquivariantUNet(in_channels, in_channels, cfg.channels, cfg.group,
                               cfg.attention_levels, cfg.heads)
    if cfg.model == "diffusers-unet":
        try:
            from diffusers import UNet2DModel
        except ImportError as exc:
            raise ValueError("model='diffusers-unet' needs diffusers installed "
                             "(pip install 'symfast[integrations]')") from exc
        levels = len(cfg.channels)
        attention = set(cfg.attention_levels if cfg.attention_levels is not None else (levels - 1,))
        return UNet2DModel(
            sample_size=cfg.image_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=tuple(cfg.channels), layers_per_block=1,
            norm_num_groups=min(8, *cfg.channels),
            attention_head_dim=max(1, cfg.channels[-1] // cfg.heads),
            down_block_types=tuple("AttnDownBlock2D" if i in attention else "DownBlock2D"
                                   for i in range(levels)),
            up_block_types=tuple("AttnUpBlock2D" if levels - 1 - i in attention else "UpBlock2D"
                                 for i in range(levels)))
    raise ValueError("model='custom' needs the network passed in: train(network=...) (the "
                     "command line cannot build one)")


def training_denoiser(cfg: TrainConfig, net: nn.Module | Any) -> Denoiser:
    """The denoiser whose loss is minimised. ``net`` may be DDP- or compile-wrapped, so the
    averaging choice is explicit: averaging only with fa_train."""
    group = cfg.group if cfg.equivariance in ("wt", "fa", "reg") else None
    return Denoiser(net, cfg.prediction, cfg.schedule(), group=group,
                    frame_average=cfg.fa_train)


def sampling_denoiser(cfg: TrainConfig, net: nn.Module) -> Denoiser:
    """The denoiser that samples: frame-averaged for "fa", declared equivariant (one call, noise
    transformed with the state) for "wt", plain otherwise (Reg is only nearly equivariant)."""
    if cfg.equivariance == "fa":
        return Denoiser(net, cfg.prediction, cfg.schedule(), group=cfg.group,
                        frame_average=True)
    if cfg.equivariance == "wt":
        return Denoiser(net, cfg.prediction, cfg.schedule(), group=cfg.group,
                        frame_average=False)
    return Denoiser(net, cfg.prediction, cfg.schedule())
