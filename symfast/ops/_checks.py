"""The argument checks every public op shares, with one wording for each kind of mistake.

Each op runs its checks once, before resolving the backend, so every backend (the reference
included) refuses the same inputs with the same error naming the argument. Type mistakes (not a
tensor, not floating point, dtypes that differ) raise TypeError; values, shapes and devices
raise ValueError.
"""
from __future__ import annotations

import math
import numbers

import torch

from symfast._backend import BACKENDS


def tensor(name: str, t, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        alternative = " or None" if optional else ""
        raise TypeError(f"{name} must be a torch.Tensor{alternative}, got {type(t).__name__}")


_COMPUTE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def floating(name: str, t, *, optional: bool = False) -> None:
    """A tensor of real floating point: the kernels take nothing else, and for the reference an
    int or bool input has no meaning here (bool + bool is OR) and complex would be cast to real.
    The float8 types are storage formats that torch itself computes little with (the kernels
    raised NotImplementedError for them)."""
    tensor(name, t, optional=optional)
    if t is not None and t.dtype not in _COMPUTE_DTYPES:
        raise TypeError(f"{name} must be a real floating-point tensor (float32, float64, float16 "
                        f"or bfloat16), got {t.dtype}")


def integer_tensor(name: str, t, what: str) -> None:
    tensor(name, t)
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer (int64) tensor of {what}, got {t.dtype}")


def like(name: str, t: torch.Tensor | None, ref_name: str, ref: torch.Tensor, *,
         dtype: bool = True, device: bool = True) -> None:
    """``t`` (skipped when None) has ``ref``'s dtype and/or device."""
    if t is None:
        return
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if device and t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def shape(name: str, t: torch.Tensor | None, expected: tuple[int, ...], why: str = "") -> None:
    """``t`` (skipped when None) has exactly the shape ``expected``."""
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{why}, got {tuple(t.shape)}")


def integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def positive_int(name: str, value) -> int:
    """A size: an int (not a bool) >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def positive_int_or_none(name: str, value) -> int | None:
    if value is not None:
        positive_int(name, value)
    return value


def real(name: str, value) -> float:
    """A real host number (not a bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def finite_number(name: str, value, *, positive: bool) -> float:
    """A finite real host number (not a bool; numpy scalars too), > 0 when ``positive`` and
    >= 0 otherwise, as a float; ValueError naming ``name`` for anything else (NaN and a
    non-number included: these are settings, from configs and flags as often as from code)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value < math.inf \
            or not (value > 0 if positive else value >= 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, "
                         f"got {value!r}")
    return float(value)


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def backend_name(backend) -> None:
    """A backend name (or None / "auto"); whether it can run is decided per call. Modules check
    it at construction, so a typo fails there and not at the first forward."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, None or 'auto'; got {backend!r}")
