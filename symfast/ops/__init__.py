"""symfast's accelerated ops. Each takes ``backend=`` ("reference", "cpu", "triton", None)."""
from symfast.ops.group_average import orbit, orbit_mean

__all__ = ["orbit", "orbit_mean"]
