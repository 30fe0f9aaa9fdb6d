"""Finite groups acting on the trailing dims of a tensor by signed permutations.

A :class:`Group` is a list of elements ``g_k`` (element 0 is the identity), each a linear map that
permutes the entries of the trailing ``event_ndim`` dims and possibly flips their signs. Because the
action is a signed permutation, it is fully described for a given trailing shape by a *gather table*:
``(g_k x).flat[i] = sign * x.flat[src]``. The table is built by applying the element to
``arange(1, N + 1)`` (so the reference action is the single source of truth) and is encoded as one
int32 per entry: ``src`` for ``+``, ``~src`` (= -src - 1) for ``-``. Tables are cached per
(trailing shape, device).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator
from typing import Any, Callable, Iterator, Sequence

import torch

Action = Callable[[torch.Tensor], torch.Tensor]


# Elements are partials of module-level functions, not lambdas, so groups (and the modules
# that hold one) pickle: torch.save of a model, spawn-started workers.
def _rotate(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(x, k, dims=(-2, -1))


def _flip_dims(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(x, dims=dims)


def _in_turn(x: torch.Tensor, first: Action, second: Action) -> torch.Tensor:
    return second(first(x))


def _roll(x: torch.Tensor, shift: int) -> torch.Tensor:
    return torch.roll(x, shift, dims=-1)


def _permute_channels(x: torch.Tensor, perm: list[int]) -> torch.Tensor:
    return x[..., perm, :, :]


def _rot(k: int) -> Action:
    return functools.partial(_rotate, k=k)


def _flip(*dims: int) -> Action:
    return functools.partial(_flip_dims, dims=dims)


def _then(first: Action, second: Action) -> Action:
    return functools.partial(_in_turn, first=first, second=second)


class Group:
    """A finite group acting on the trailing ``event_ndim`` dims of tensors.

    Args:
        name: human-readable name.
        elements: the actions ``x -> g_k x``; element 0 must be the identity.
        event_ndim: how many trailing dims the group acts on.
        probe_shape: a trailing shape on which all elements are defined and distinct; used to
            verify closure and to build the multiplication table.
        square: the action needs the last two dims to be equal (rotations).
        fixed_sizes: per event dim, the size the action needs there, or None for any size
            (cyclic(n) needs n; channel_perm needs its channel count); default all None.

    The group ops live in symfast.ops (orbit, orbit_mean): this module imports nothing of symfast,
    so every layer above it can use it.
    """

    def __init__(self, name: str, elements: Sequence[Action], event_ndim: int,
                 probe_shape: Sequence[int], square: bool = False,
                 fixed_sizes: Sequence[int | None] | None = None):
        if len(elements) == 0:
            raise ValueError("elements must hold at least the identity")
        if len(probe_shape) != event_ndim:
            raise ValueError(f"probe_shape {tuple(probe_shape)} must have event_ndim={event_ndim} dims")
        fixed_sizes = [None] * event_ndim if fixed_sizes is None else list(fixed_sizes)
        if len(fixed_sizes) != event_ndim or not all(
                s is None or (isinstance(s, int) and s >= 1) for s in fixed_sizes):
            raise ValueError(f"fixed_sizes must hold event_ndim={event_ndim} entries, each a positive "
                             f"int or None; got {fixed_sizes!r}")
        self.fixed_sizes = fixed_sizes
        self.name = name
        self.elements = list(elements)
        self.event_ndim = event_ndim
        self.probe_shape = tuple(int(s) for s in probe_shape)
        self.square = square
        self._table_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._build_multiplication_table()

    # ---- structure -------------------------------------------------------------------------
    def _build_multiplication_table(self) -> None:
        probe = self._signed_tables(self.probe_shape)
        keys = [tuple(row.tolist()) for row in probe]
        if len(set(keys)) != len(keys):
            raise ValueError(f"group {self.name!r}: two elements act identically on {self.probe_shape}")
        if keys[0] != tuple(range(1, probe.shape[1] + 1)):
            raise ValueError(f"group {self.name!r}: element 0 must be the identity")
        index = {key: k for k, key in enumerate(keys)}
        n = len(keys)
        self._compose = [[0] * n for _ in range(n)]
        base = torch.arange(1, probe.shape[1] + 1, dtype=torch.int64).reshape(self.probe_shape)
        for i, j in itertools.product(range(n), range(n)):
            key = tuple(self.elements[i](self.elements[j](base)).reshape(-1).tolist())
            if key not in index:
                raise ValueError(f"group {self.name!r} is not closed: g{i}∘g{j} is not an element")
            self._compose[i][j] = index[key]
        missing = [i for i in range(n) if 0 not in self._compose[i]]
        if missing:
            raise ValueError(f"group {self.name!r}: element {missing[0]} has no inverse among the "
                             f"elements (no g with g{missing[0]}∘g the identity); a group's elements "
                             f"must be invertible")
        self._inverse = [self._compose[i].index(0) for i in range(n)]

    def __len__(self) -> int:
        return len(self.elements)

    def __repr__(self) -> str:
        return f"Group({self.name!r}, order={len(self)}, event_ndim={self.event_ndim})"

    def same_elements(self, other: "Group") -> bool:
        """Whether ``other`` acts by the same set of transformations (names alone do not say:
        every channel_perm group on C channels is named "channel_perm(C)")."""
        if other is self:
            return True
        if (not isinstance(other, Group) or len(other) != len(self)
                or other.event_ndim != self.event_ndim or other.probe_shape != self.probe_shape):
            return False
        return self.within(other)

    def within(self, other: "Group") -> bool:
        """Whether every element of this group is one of ``other``'s (c4 within d4, flip_h within
        d4), judged by their action on a probe on which both groups act faithfully (each one's
        probe shape, padded to the larger event_ndim, the larger size per dim): on flip_v's own
        (4, 1) probe c2's rotation by 180° moves every entry as the vertical flip does. False
        where ``other`` cannot act on such a probe (its fixed sizes)."""
        if other is self:
            return True
        if not isinstance(other, Group):
            return False
        probe = _common_probe(self, other)
        try:
            return probe is not None and None not in self.indices_in(other, probe)
        except ValueError:
            return False

    def indices_in(self, other: "Group", event_shape: Sequence[int]) -> list[int | None]:
        """Per element of this group: the index of the element of ``other`` that acts the same on
        tensors whose trailing dims are ``event_shape`` (None where none does). Both act on an
        event of distinct values, so two elements match only if they move every entry alike
        (c2's rotation by 180° is d4's element 2)."""
        event_shape = tuple(int(s) for s in event_shape)
        for group in (self, other):
            group.check_input(torch.empty(event_shape, device="meta"), "event_shape")
        theirs = {row: j for j, row in enumerate(map(tuple, other._signed_tables(event_shape).tolist()))}
        return [theirs.get(row) for row in map(tuple, self._signed_tables(event_shape).tolist())]

    def _index(self, k: Any, name: str = "k") -> int:
        """k as an element index: an integer in [0, |G|) (a negative index would wrap silently)."""
        try:
            index = None if isinstance(k, bool) else operator.index(k)
        except TypeError:
            index = None
        if index is None or not 0 <= index < len(self.elements):
            raise ValueError(f"{name} must be an element index, an int in [0, {len(self.elements)}) "
                             f"for group {self.name}, got {k!r}")
        return index

    def inverse(self, k: int) -> int:
        """Index of g_k⁻¹."""
        return self._inverse[self._index(k)]

    def compose(self, i: int, j: int) -> int:
        """Index of g_i ∘ g_j (apply g_j first)."""
        return self._compose[self._index(i, "i")][self._index(j, "j")]

    # ---- action ----------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < self.event_ndim:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; group {self.name} acts on the last "
                             f"{self.event_ndim} dims")
        if self.square and x.shape[-1] != x.shape[-2]:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; group {self.name} contains rotations, "
                             f"which need square trailing dims (H == W)")
        for dim, need in zip(range(-self.event_ndim, 0), self.fixed_sizes):
            if need is not None and x.shape[dim] != need:
                raise ValueError(f"{name} has shape {tuple(x.shape)}; group {self.name} needs size "
                                 f"{need} at dim {dim}")

    def act(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """g_k x. x: (..., *event_shape)."""
        self.check_input(x)
        return self.elements[self._index(k)](x)

    # ---- gather tables ---------------------------------------------------------------------
    def _signed_tables(self, event_shape: Sequence[int]) -> torch.Tensor:
        """(|G|, N) int64: entry i of row k is ±(src + 1), with (g_k x).flat[i] = ±x.flat[src]."""
        n = 1
        for s in event_shape:
            n *= int(s)
        base = torch.arange(1, n + 1, dtype=torch.int64).reshape(tuple(event_shape))
        images = [g(base) for g in self.elements]
        for k, image in enumerate(images):
            self.check_image(k, base, image)
        return torch.stack([image.reshape(-1) for image in images])

    def check_image(self, k: int, x: torch.Tensor, image: torch.Tensor) -> None:
        """ValueError unless g_k x (``image``) has x's shape: a gather table keeps the shape, and
        a transposed event squeezed back into it gave scrambled values."""
        if image.shape != x.shape:
            shape = tuple(x.shape[x.dim() - self.event_ndim:])
            got = tuple(image.shape[image.dim() - self.event_ndim:]) if image.dim() >= self.event_ndim \
                else tuple(image.shape)
            hint = "" if self.square else " (a rotation or transpose needs square=True, so inputs must have H == W)"
            raise ValueError(f"group {self.name!r}: element {k} maps an event of shape {shape} to "
                             f"{got}; elements must keep the shape{hint}")

    def tables(self, event_shape: Sequence[int], device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(table, inverse_table), each (|G|, N) int32 on ``device``: row k of ``table`` gathers
        g_k x and row k of ``inverse_table`` gathers g_k⁻¹ x (encoding in the module docstring)."""
        key = (tuple(int(s) for s in event_shape), torch.device(device))
        hit = self._table_cache.get(key)
        if hit is None:
            with real_tensors():
                hit = self._table_cache[key] = self._build_tables(key)
        return for_dispatch_mode(hit)

    def _build_tables(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if math.prod(key[0]) >= 2**31 - 1:
            raise ValueError(f"event shape {key[0]} is too large for int32 gather tables")
        signed = self._signed_tables(key[0])
        encoded = torch.where(signed > 0, signed - 1, signed)  # -(src+1) == ~src
        encoded = encoded.to(torch.int32)
        inverse = encoded[[self.inverse(k) for k in range(len(self))]]
        return encoded.contiguous().to(key[1]), inverse.contiguous().to(key[1])


def under_dispatch_mode() -> bool:
    """Whether a TorchDispatchMode runs (FakeTensorMode: torch.export, shape inference)."""
    # torch.export runs is_compiling() True with a FakeTensorMode on: only dynamo itself is excluded
    return not torch.compiler.is_dynamo_compiling() and torch._C._len_torch_dispatch_stack() > 0


@contextlib.contextmanager
def real_tensors() -> Iterator[None]:
    """Host-side tables (gather indices) are built as real CPU tensors even under a dispatch mode
    or a default device (``with torch.device("meta")``, ``torch.set_default_device``): they are
    cached for every later call, and a fake or meta one kept would break each real call after."""
    if torch.compiler.is_dynamo_compiling():  # dynamo traces the construction: no modes to leave
        yield
        return
    with torch.device("cpu"):
        if not under_dispatch_mode():
            yield
            return
        from torch.utils._python_dispatch import _disable_current_modes
        with _disable_current_modes():
            yield


def for_dispatch_mode(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Cached real tables as the running FakeTensorMode takes them: as they are where it accepts
    real constants (torch.export lifts them into the program), else as fakes of them."""
    if not under_dispatch_mode():
        return tensors
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, FakeTensorMode) and not mode.allow_non_fake_inputs:
            return tuple(mode.from_tensor(t) for t in tensors)
    return tensors


# ---- constructors --------------------------------------------------------------------------

def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def trivial() -> Group:
    return Group("trivial", [_identity], event_ndim=0, probe_shape=())


def flip_h() -> Group:
    """Mirror the last dim (W)."""
    return Group("flip_h", [_identity, _flip(-1)], event_ndim=1, probe_shape=(4,))


def flip_v() -> Group:
    """Mirror dim -2 (H)."""
    return Group("flip_v", [_identity, _flip(-2)], event_ndim=2, probe_shape=(4, 1))


def c2() -> Group:
    """Rotations by 0 and 180 degrees (works on non-square H, W)."""
    return Group("c2", [_identity, _flip(-2, -1)], event_ndim=2, probe_shape=(4, 4))


def c4() -> Group:
    """Rotations by multiples of 90 degrees on (..., H, W), H == W."""
    return Group("c4", [_identity, _rot(1), _rot(2), _rot(3)], event_ndim=2, probe_shape=(4, 4),
                 square=True)


def d4() -> Group:
    """The 8 symmetries of the square: 4 rotations, then the 4 reflections."""
    rotations = [_identity, _rot(1), _rot(2), _rot(3)]
    reflections = [_then(_flip(-1), r) for r in rotations]
    return Group("d4", rotations + reflections, event_ndim=2, probe_shape=(4, 4), square=True)


def cyclic(n: int) -> Group:
    """Cyclic shifts of the last dim, whose size must be ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return Group(f"cyclic({n})", [functools.partial(_roll, shift=s) for s in range(n)],
                 event_ndim=1, probe_shape=(n,), fixed_sizes=[n])


def channel_perm(perms: Sequence[Sequence[int]]) -> Group:
    """Permutations of dim -3 (channels of (..., C, H, W)); ``perms`` lists the elements, each a
    permutation of range(C), and must be closed under composition and contain the identity."""
    try:
        perms = [[operator.index(i) for i in p] for p in perms]
    except TypeError:
        raise TypeError(f"perms must be a list of permutations (each a list of channel indices), "
                        f"e.g. [[0, 1, 2], [1, 0, 2]]; got {perms!r}") from None
    if not perms:
        raise ValueError("perms must be a non-empty list of permutations")
    c = len(perms[0])
    for p in perms:
        if sorted(p) != list(range(c)):
            raise ValueError(f"perms must be permutations of range({c}); got {p}")
    identity = list(range(c))
    if identity in perms:
        perms.remove(identity)
    elements = [_identity] + [functools.partial(_permute_channels, perm=p) for p in perms]
    return Group(f"channel_perm({c})", elements, event_ndim=3, probe_shape=(c, 1, 1),
                 fixed_sizes=[c, None, None])


def sign_flip() -> Group:
    """x -> -x."""
    return Group("sign", [_identity, torch.neg], event_ndim=0, probe_shape=())


def _padded(values: Sequence, ndim: int, fill) -> list:
    return [fill] * (ndim - len(values)) + list(values)


def _common_fixed_sizes(a: Group, b: Group) -> list[int | None] | None:
    """Per dim of the larger event_ndim, the size either group needs there (None: any); None
    where the two need different sizes of the same dim."""
    ndim = max(a.event_ndim, b.event_ndim)
    fixed = []
    for p, q in zip(_padded(a.fixed_sizes, ndim, None), _padded(b.fixed_sizes, ndim, None)):
        if p is not None and q is not None and p != q:
            return None
        fixed.append(p if p is not None else q)
    return fixed


def _common_probe(a: Group, b: Group) -> list[int] | None:
    """A trailing shape on which both groups act, each as faithfully as on its own probe: the
    probe shapes padded with leading 1s to the larger event_ndim, the larger size per dim, a
    fixed size where either group needs one (None where the two need different sizes), square
    where either rotates."""
    fixed = _common_fixed_sizes(a, b)
    if fixed is None:
        return None
    ndim = len(fixed)
    probe = [max(p, q) for p, q in zip(_padded(a.probe_shape, ndim, 1), _padded(b.probe_shape, ndim, 1))]
    if a.square or b.square:
        probe[-1] = probe[-2] = max(probe[-1], probe[-2])
    return [need if need is not None else size for size, need in zip(probe, fixed)]


def product(a: Group | str, b: Group | str) -> Group:
    """Direct product: elements g_a ∘ g_b; the two actions must commute (checked on the probe:
    c4 and flip_h do not, and their "product" would be D4 under another name). ``a`` and ``b``
    are groups or their names."""
    a, b = get(a), get(b)
    ndim = max(a.event_ndim, b.event_ndim)
    probe = _common_probe(a, b)
    if probe is None:
        raise ValueError(f"product({a.name}, {b.name}): the two groups need different sizes of "
                         f"the same dim ({a.fixed_sizes} and {b.fixed_sizes})")
    elements = [_then(gb, ga) for ga in a.elements for gb in b.elements]
    base = torch.arange(math.prod(probe), dtype=torch.int64).reshape(probe)
    for i, ga in enumerate(a.elements):
        for j, gb in enumerate(b.elements):
            if not torch.equal(ga(gb(base)), gb(ga(base))):
                raise ValueError(f"product({a.name}, {b.name}): element {i} of {a.name} and element "
                                 f"{j} of {b.name} do not commute; a direct product needs actions "
                                 f"that commute")
    return Group(f"{a.name}×{b.name}", elements, event_ndim=ndim, probe_shape=probe,
                 square=a.square or b.square, fixed_sizes=_common_fixed_sizes(a, b))


_NAMED = {"trivial": trivial, "flip_h": flip_h, "flip_v": flip_v, "c2": c2, "c4": c4, "d4": d4,
          "sign": sign_flip}
_ALIASES = {"sign_flip": "sign"}  # the function's name, for the group's
# Built at import (5 ms for all): a first get() inside a torch.compile'd function would have
# dynamo trace the construction, whose tables are data-dependent (and fail under fullgraph=True).
_NAMED_CACHE: dict[str, Group] = {name: make() for name, make in _NAMED.items()}


def get(name: str | Group) -> Group:
    """A group by name: one of "trivial", "flip_h", "flip_v", "c2", "c4", "d4", "sign" (or
    "sign_flip", as the function that makes it is called)."""
    if isinstance(name, Group):
        return name
    if not isinstance(name, str):
        raise TypeError(f"group must be a str or a symfast.groups.Group, got {type(name).__name__}")
    name = _ALIASES.get(name, name)
    if name not in _NAMED:
        raise ValueError(f"unknown group name {name!r}; expected one of {sorted(_NAMED)}")
    if name not in _NAMED_CACHE:
        _NAMED_CACHE[name] = _NAMED[name]()
    return _NAMED_CACHE[name]
