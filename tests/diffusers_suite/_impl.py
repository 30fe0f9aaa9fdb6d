"""The six scheduler classes the vendored tests exercise: symfast's, or diffusers' own when
SYMFAST_DIFFUSERS_SUITE=diffusers (to check that a test passes on diffusers' classes too)."""
import os

IMPL = os.environ.get("SYMFAST_DIFFUSERS_SUITE", "symfast")
if IMPL == "diffusers":
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: F401
                           EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler)
elif IMPL == "symfast":
    from symfast.integrations.diffusers import (DDIMScheduler, DDPMScheduler,  # noqa: F401
                                                DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                                                EulerDiscreteScheduler, HeunDiscreteScheduler)
else:
    raise ValueError(f"SYMFAST_DIFFUSERS_SUITE must be 'symfast' or 'diffusers', got {IMPL!r}")
