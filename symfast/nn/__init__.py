"""Equivariant layers and models: tied convolutions, an exactly equivariant UNet, the
equivariance regulariser."""
from symfast.nn.regularizer import equivariance_loss
from symfast.nn.tied import TieReport, TiedConv2d, tie_weights
from symfast.nn.unet import EquivariantUNet, UNet

__all__ = ["TiedConv2d", "tie_weights", "TieReport", "EquivariantUNet", "UNet", "equivariance_loss"]
