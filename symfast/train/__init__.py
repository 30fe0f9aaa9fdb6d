"""symfast.train: train diffusion models (plain, augment, FA, WT, Reg) from one process to many.

``train(config)`` runs the loop (torchrun + DDP when launched under torchrun); ``load(path)``
returns a checkpoint's ready Denoiser and config. See :class:`TrainConfig` for the options.
"""
from symfast.train.api import denoise_file, export, load, sample_to_file
from symfast.train.checkpoint import Checkpoint, CheckpointError
from symfast.train.config import TrainConfig, load_config_file, make_config
from symfast.train.ema import EMA
from symfast.train.loop import TrainingDiverged, TrainResult, lr_at, train

__all__ = ["train", "load", "export", "TrainConfig", "make_config", "load_config_file", "TrainResult",
           "TrainingDiverged", "EMA", "Checkpoint", "CheckpointError", "lr_at", "sample_to_file",
           "denoise_file"]
