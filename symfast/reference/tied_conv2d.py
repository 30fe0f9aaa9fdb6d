"""Reference tied convolution: a 2-D convolution whose kernels are invariant under a group.

A group G acting on the kernel's (kh, kw) grid splits the kernel positions into orbits; a
G-invariant kernel takes one value per orbit. With θ: (O, C, R) (R orbits), the convolution is

    y[b, o] = Σ_c Σ_r θ[o, c, r] · S[b, c, r],   S[b, c, r] = Σ_{(i, j) ∈ orbit r} shift_{ij}(x[b, c])

S is the *stencil* (orbit sums of shifted inputs: centre, Σ edges, Σ corners for a D4 3×3), and
the contraction over (c, r) is one GEMM over R·C instead of kh·kw·C values per output.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from symfast.groups import Group, get, real_tensors


@dataclass(frozen=True, eq=False)  # hashed by identity: cached per group
class KernelOrbits:
    """The orbits of a (kh, kw) kernel grid under a group.

    index: (kh·kw,) int64, orbit of each position (row-major).
    positions: (kh·kw,) int32, positions sorted by orbit; offsets: (R + 1,) int32, orbit r holds
    positions[offsets[r]:offsets[r + 1]] (the CSR form the kernels read).
    """

    kernel_size: tuple[int, int]
    index: torch.Tensor
    positions: torch.Tensor
    offsets: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.offsets.numel() - 1)


_ORBIT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> {size: orbits}


def kernel_orbits(group: Group | str, kernel_size: tuple[int, int]) -> KernelOrbits:
    """Orbits of the kernel positions under ``group``; ValueError if the group cannot act on a
    kernel of this size by permuting its positions (e.g. C4 or D4 on a non-square kernel)."""
    group = get(group)
    kh, kw = kernel_size
    if torch.compiler.is_compiling():
        # Finding the orbits reads tensor values (data-dependent to dynamo: fullgraph=True failed
        # where the cache had no entry for this group object, e.g. a deepcopied module): the
        # tables enter the graph as constants, computed eagerly by _orbit_of_each_position.
        orbit_of = _orbit_of_each_position(group, kh, kw)
        if isinstance(orbit_of, str):
            raise ValueError(orbit_of)
        return _orbits_from_index((kh, kw), orbit_of)
    return _cached_orbits(group, kh, kw)


def _cached_orbits(group: Group, kh: int, kw: int) -> KernelOrbits:
    cached = _ORBIT_CACHE.setdefault(group, {})
    if (kh, kw) not in cached:
        with real_tensors():  # host tables, cached: never fakes (see symfast.groups.real_tensors)
            cached[(kh, kw)] = _kernel_orbits(group, kh, kw)
    return cached[(kh, kw)]


@torch.compiler.assume_constant_result
def _orbit_of_each_position(group: Group, kh: int, kw: int) -> tuple[int, ...] | str:
    """The orbit of each position, or the ValueError's message (raised in the traced code, so
    the user gets the ValueError rather than dynamo's internal error wrapping it)."""
    try:
        return tuple(_cached_orbits(group, kh, kw).index.tolist())
    except ValueError as exc:
        return str(exc)


def _orbits_from_index(kernel_size: tuple[int, int], orbit_of: tuple[int, ...]) -> KernelOrbits:
    """KernelOrbits from the orbit number of each position (orbits numbered by first position)."""
    count = max(orbit_of) + 1
    positions = sorted(range(len(orbit_of)), key=lambda p: orbit_of[p])  # stable: by position
    offsets = [0] * (count + 1)
    for r in orbit_of:
        offsets[r + 1] += 1
    for r in range(count):
        offsets[r + 1] += offsets[r]
    return KernelOrbits(kernel_size, torch.tensor(orbit_of, dtype=torch.int64),
                        torch.tensor(positions, dtype=torch.int32),
                        torch.tensor(offsets, dtype=torch.int32))


def _kernel_orbits(group: Group, kh: int, kw: int) -> KernelOrbits:
    if group.event_ndim > 2 or any(s is not None for s in group.fixed_sizes):
        raise ValueError(f"group {group.name} does not act on a kernel's spatial grid; tied "
                         f"convolutions take flips and rotations (flip_h, flip_v, c2, c4, d4)")
    if group.square and kh != kw:
        raise ValueError(f"group {group.name} contains rotations, which need a square kernel; "
                         f"got kernel_size=({kh}, {kw})")
    n = kh * kw
    base = torch.arange(1, n + 1, dtype=torch.int64).reshape(kh, kw)
    images = [g(base).reshape(-1) for g in group.elements]
    for img in images:
        if img.shape[0] != n or bool((img <= 0).any()) or sorted(img.tolist()) != list(range(1, n + 1)):
            raise ValueError(f"group {group.name} does not permute the positions of a ({kh}, {kw}) "
                             f"kernel (it changes signs or shapes), so it cannot be tied")
    # Union of the positions each element maps together; orbits numbered by their first position.
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for img in images:
        for dst, src in enumerate(img.tolist()):
            ra, rb = find(dst), find(src - 1)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    roots = sorted({find(p) for p in range(n)})
    number = {r: k for k, r in enumerate(roots)}
    return _orbits_from_index((kh, kw), tuple(number[find(p)] for p in range(n)))


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def expand_weight(weight: torch.Tensor, orbits: KernelOrbits) -> torch.Tensor:
    """θ: (O, C, R) -> the dense G-invariant kernel (O, C, kh, kw)."""
    o, c, _ = weight.shape
    return weight[:, :, orbits.index.to(weight.device)].reshape(o, c, *orbits.kernel_size)


def stencil(x: torch.Tensor, orbits: KernelOrbits, stride: tuple[int, int],
            padding: tuple[int, int]) -> torch.Tensor:
    """x: (B, C, H, W) -> S: (B, C, R, Ho, Wo), S[:, :, r] = Σ_{p ∈ orbit r} shifted x."""
    kh, kw = orbits.kernel_size
    sh, sw = stride
    ph, pw = padding
    b, c, h, w = x.shape
    ho, wo = output_size(h, kh, sh, ph), output_size(w, kw, sw, pw)
    xp = F.pad(x, (pw, pw, ph, ph))
    sums = []
    for r in range(orbits.count):
        total = None
        for p in orbits.positions[orbits.offsets[r]:orbits.offsets[r + 1]].tolist():
            i, j = divmod(p, kw)
            shifted = xp[:, :, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw]
            total = shifted if total is None else total + shifted
        sums.append(total)
    return torch.stack(sums, dim=2)


def tied_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                orbits: KernelOrbits, stride: tuple[int, int] = (1, 1),
                padding: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """x: (B, C, H, W), weight θ: (O, C, R), bias: (O,) or None -> (B, O, Ho, Wo).
    Equals F.conv2d(x, expand_weight(θ), bias, stride, padding)."""
    s = stencil(x, orbits, stride, padding)
    y = torch.einsum("ocr,bcrhw->bohw", weight, s)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y
