"""Counter-based Philox4x32-10 noise, bit-compatible with Triton's ``tl.philox`` / ``tl.randn``.

This is the reference implementation in PyTorch integer ops (int64 tensors holding uint32 values).
It follows ``triton/language/random.py`` exactly: the 64-bit seed split into the key (lo, hi), ten
rounds with the Philox constants, the key raised by the Weyl constants after each round, the
uint32 -> float conversion ``(x < 0 ? ~x : x) * 4.6566127342e-10`` on the int32 bit pattern, and
Box–Muller ``sqrt(-2 log max(u1, 1e-7)) * cos(2π u2)`` in float32.

Float64 normals (``dtype=torch.float64``, what a float64 sampler step adds) take the same two
Philox words through the same map in float64: ``u = (x < 0 ? ~x : x) · 2^-31`` (exact), then
Box–Muller in float64. They are the float32 normals to within float32 rounding (~1e-7 relative),
and the kernels compute them to float64 precision, so a float64 step agrees with this reference
to float64 precision, which float32 normals (whose log and cos differ between torch, the C++
kernel and Triton in the last bits) could not.

Sampler noise is keyed by (seed, step, stream, element): key = seed, counter
(c0, c1, c2, c3) = (element // 4, step, stream, 0), whose four output words make two Box–Muller
pairs, (w0, w1) and (w2, w3), each giving two normals (r cos θ, r sin θ): element e takes normal
e % 4. With step = stream = 0 this is ``tl.randn4x(seed, element // 4)[element % 4]``. One
Philox call (ten rounds) and two logarithms and square roots thus serve four normals, not one:
drawing is what made a noisy sampler step cost 3x a noiseless one on the CPU
(benchmarks/bench_sampler.py). ``stream`` is the sample's index in its batch when one seed covers
the batch, and 0 when every sample has its own seed, so a sample's noise does not depend on the
batch it is in.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
UNIFORM_SCALE = 4.6566127342e-10  # Triton's: the largest s with (2^31 - 1) * s < 1 in float32
TWO_PI = 6.283185307179586


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a, b < 2^32, without overflowing int64: b is split into
    16-bit halves so every partial product stays below 2^48."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi = a * b_hi
    p_lo = a * b_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox(seed: torch.Tensor | int, c0: torch.Tensor, c1: torch.Tensor | int = 0,
           c2: torch.Tensor | int = 0, c3: torch.Tensor | int = 0, rounds: int = 10
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32 of the counter (c0..c3) under the 64-bit ``seed``; all broadcast together.
    Returns four int64 tensors holding uint32 values."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=c0.device)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = torch.as_tensor(c0, dtype=torch.int64, device=c0.device) & _MASK32
    c1 = torch.as_tensor(c1, dtype=torch.int64, device=c0.device) & _MASK32
    c2 = torch.as_tensor(c2, dtype=torch.int64, device=c0.device) & _MASK32
    c3 = torch.as_tensor(c3, dtype=torch.int64, device=c0.device) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


_DTYPES = (torch.float32, torch.float64)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")


def uint_to_uniform(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Triton's uint32 -> [0, 1) on the int32 bit pattern: float32 with Triton's scale, or
    float64 with 2^-31 (exact)."""
    _check_dtype(dtype)
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    scale = UNIFORM_SCALE if dtype == torch.float32 else 2.0**-31
    return signed.to(dtype) * torch.tensor(scale, dtype=dtype)


def box_muller_pair(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's ``pair_uniform_to_normal``: (r cos θ, r sin θ) with r = sqrt(-2 log max(u1, 1e-7))
    and θ = 2π u2, in the uniforms' dtype (float32 as Triton, or float64)."""
    u1 = torch.clamp(u1, min=1.0e-7)
    th = torch.tensor(TWO_PI, dtype=u2.dtype) * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """The first output of :func:`box_muller_pair` (what ``tl.randn`` keeps)."""
    return box_muller_pair(u1, u2)[0]


def randn_counter(seed: torch.Tensor | int, c0: torch.Tensor, c1: torch.Tensor | int = 0,
                  c2: torch.Tensor | int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normals of ``dtype`` (float32: ``tl.randn``'s; float64: the same words through
    float64 Box–Muller), one per counter (c0, c1, c2, 0) under ``seed``."""
    r0, r1, _, _ = philox(seed, c0, c1, c2, 0)
    return box_muller(uint_to_uniform(r0, dtype), uint_to_uniform(r1, dtype))


def randn4_counter(seed: torch.Tensor | int, c0: torch.Tensor, c1: torch.Tensor | int = 0,
                   c2: torch.Tensor | int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Four standard normals per counter (c0, c1, c2, 0) under ``seed``, stacked on a new last
    dim: both Box–Muller outputs of the word pairs (w0, w1) and (w2, w3) (``tl.randn4x``'s for
    float32)."""
    u = [uint_to_uniform(w, dtype) for w in philox(seed, c0, c1, c2, 0)]
    return torch.stack(box_muller_pair(u[0], u[1]) + box_muller_pair(u[2], u[3]), dim=-1)


def _seed_word(seed: int) -> int:
    """A seed as the signed 64-bit word the key holds: any int in [−2^63, 2^64), where s and
    s − 2^64 are the same 64 bits (so the same noise)."""
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [-2^63, 2^64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def seeded_generator(seed: int, name: str = "seed") -> torch.Generator:
    """A CPU torch.Generator seeded with ``seed`` (an int in [−2^63, 2^64)), or a
    ValueError/TypeError naming ``name`` (manual_seed's own errors name nothing)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int, got {seed!r}")
    if not -2**63 <= seed < 2**64:
        raise ValueError(f"{name} must be an int in [-2^63, 2^64), got {seed}")
    # torch's CPU generator (MT19937) keeps the seed's low 32 bits only: 0 and 2^32 drew the same
    # numbers. The high word is mixed into them (a seed below 2^32 is used as it is)
    word = seed % 2**64
    low, high = word & 0xFFFFFFFF, word >> 32
    return torch.Generator().manual_seed((low + high * 0x9E3779B1) % 2**32)


def noise_key(seed: int | list[int] | tuple[int, ...] | torch.Tensor, batch: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, 2) int64 [seed, stream] rows: one int seed -> streams 0..batch-1; one seed per
    sample -> stream 0 each (so a sample's noise is independent of the batch)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an int or a list of ints, got {seed!r}")
    if isinstance(seed, int):
        seeds = torch.full((batch,), _seed_word(seed), dtype=torch.int64)
        streams = torch.arange(batch, dtype=torch.int64)
    else:
        if isinstance(seed, torch.Tensor):
            if seed.dtype.is_floating_point or seed.dim() != 1:
                raise TypeError(f"seed tensor must be a 1-d integer tensor, got {seed.dtype} "
                                f"{tuple(seed.shape)}")
            seeds = seed.detach().to("cpu", torch.int64)
        elif isinstance(seed, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool)
                                                      for s in seed):
            seeds = torch.tensor([_seed_word(s) for s in seed], dtype=torch.int64)
        else:
            raise TypeError(f"seed must be an int, a list of ints or an int tensor, got {seed!r}")
        if seeds.shape[0] != batch:
            raise ValueError(f"seed has {seeds.shape[0]} entries but the batch has {batch} samples")
        streams = torch.zeros(batch, dtype=torch.int64)
    return torch.stack([seeds, streams], dim=1).to(device)


def sample_noise(key: torch.Tensor, step: int, shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise for a batch: key (B, 2) from :func:`noise_key`, shape (B, ...) -> (B, ...) of
    ``dtype`` (float32, or float64 for a float64 step), element index = flat index within the
    sample; element e is normal e % 4 of counter (e // 4, step, stream, 0)."""
    _check_dtype(dtype)
    shape = tuple(shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"shape must be a non-empty tuple of ints >= 0 (B, ...), got {shape!r}")
    b = shape[0]
    if (not isinstance(key, torch.Tensor) or key.dtype != torch.int64
            or tuple(key.shape) != (b, 2)):
        got = f"{key.dtype} {tuple(key.shape)}" if isinstance(key, torch.Tensor) else type(key).__name__
        raise ValueError(f"key must be an int64 tensor of shape ({b}, 2) (noise_key(seed, {b})), "
                         f"got {got}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**32:
        raise ValueError(f"step must be an int in [0, 2^32), got {step!r}")
    n = 1
    for s in shape[1:]:
        n *= s
    counter = torch.arange((n + 3) // 4, dtype=torch.int64, device=key.device).unsqueeze(0)
    z = randn4_counter(key[:, :1], counter, step, key[:, 1:2], dtype)  # (B, counters, 4)
    return z.reshape(b, counter.shape[1] * 4)[:, :n].reshape((b,) + tuple(shape[1:]))  # b may be 0
