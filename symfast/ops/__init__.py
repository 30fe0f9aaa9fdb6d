"""symfast's accelerated ops. Each takes ``backend=`` ("reference", "cpu", "triton", None)."""
from symfast.ops.attention_pool import attention_pool
from symfast.ops.classifier_select import classifier_select
from symfast.ops.fused_step import StepCoefficients, fused_step
from symfast.ops.group_average import orbit, orbit_mean
from symfast.ops.group_norm_silu import group_norm_silu
from symfast.ops.tied_conv2d import tied_conv2d

__all__ = ["orbit", "orbit_mean", "fused_step", "StepCoefficients", "attention_pool",
           "classifier_select", "tied_conv2d", "group_norm_silu"]
