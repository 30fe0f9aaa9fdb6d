"""TiedConv2d (a convolution with group-invariant kernels) and tie_weights (convert a model)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from symfast.groups import Group, get
from symfast.ops import _checks
from symfast.ops.tied_conv2d import _pair, tied_conv2d
from symfast.reference.tied_conv2d import expand_weight, kernel_orbits


class TiedConv2d(nn.Module):
    """A 2-D convolution whose kernels are invariant under ``group`` (flip_h, flip_v, c2, c4, d4).

    It stores one parameter per orbit of kernel positions — weight: (out_channels, in_channels, R),
    R = 3 for a D4 or C4 3×3 kernel, 6 for a D4 5×5 or a flip 3×3 — so ``parameters()`` counts
    orbits only. x: (B, in_channels, H, W) -> (B, out_channels, Ho, Wo).

    With stride 1 and symmetric zero padding the layer commutes with every element of ``group``
    (at any input size). ``padding`` defaults to kernel_size // 2 ("same" for odd kernels).
    Raises ValueError for a group that cannot act on the kernel (e.g. C4 with a non-square one).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 group: Group | str, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] | None = None, bias: bool = True,
                 backend: str | None = None):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            _checks.positive_int(name, value)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = (_pair(padding, "padding", 0) if padding is not None
                        else (self.kernel_size[0] // 2, self.kernel_size[1] // 2))
        self.group = get(group)
        self.orbits = kernel_orbits(self.group, self.kernel_size)
        if self.group.square and self.padding[0] != self.padding[1]:
            # the output would be (H + 2ph) x (W + 2pw): a rotation of it is not the output of
            # the rotated input, so the layer could not commute with the group
            raise ValueError(f"padding {self.padding} differs between H and W, which group "
                             f"{self.group.name}'s rotations swap; give equal padding")
        _checks.backend_name(backend)
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, self.orbits.count))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Var(S_r) = |orbit r|·Var(x), so Var(y) = C·kh·kw·Var(θ)·Var(x): nn.Conv2d's default
        # bound 1/sqrt(fan_in) with the dense fan-in keeps the same output scale.
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the op would blame the weight's shape, which is fixed here: the input is what is wrong
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but this TiedConv2d takes {self.in_channels}")
        # under autocast the op casts x and the parameters to autocast's dtype (an fp32 input
        # into the first layer too, or a network of these layers ran in fp32 under bf16)
        return tied_conv2d(x, self.weight, self.bias, self.kernel_size, self.group, self.stride,
                           self.padding, backend=self.backend)

    def expanded_weight(self) -> torch.Tensor:
        """The dense G-invariant kernel (out_channels, in_channels, kh, kw)."""
        return expand_weight(self.weight, self.orbits)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, group: Group | str,
                    backend: str | None = None) -> "TiedConv2d":
        """A tied layer whose kernel is the orbit average of ``conv``'s (the nearest G-invariant
        kernel in the least-squares sense); padding and stride are kept. Raises ValueError for a
        convolution TiedConv2d cannot reproduce (grouped, dilated, a padding_mode other than
        "zeros", padding="same" with an even kernel, a kernel the group cannot act on)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        reason = _can_tie(conv, get(group))
        if reason is not None:
            raise ValueError(f"conv cannot be tied: {reason}")
        padding = conv.padding
        if isinstance(padding, str):
            padding = (0, 0) if padding == "valid" else (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
        tied = cls(conv.in_channels, conv.out_channels, conv.kernel_size, group, conv.stride,
                   padding, bias=conv.bias is not None, backend=backend)
        tied.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            index = tied.orbits.index.to(conv.weight.device)
            flat = conv.weight.reshape(conv.out_channels, conv.in_channels, -1)
            summed = torch.zeros_like(tied.weight).index_add_(2, index, flat)
            counts = torch.bincount(index, minlength=tied.orbits.count).to(flat.dtype)
            tied.weight.copy_(summed / counts)
            if conv.bias is not None:
                tied.bias.copy_(conv.bias)
        return tied

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"group={self.group.name}, orbits={self.orbits.count}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}")


@dataclass
class TieReport:
    """What :func:`tie_weights` did: ``tied`` names the converted layers (a layer used in several
    places under each of its names; all of them hold one TiedConv2d), ``problems`` lists
    ``(module name, reason)`` for everything that still breaks exact equivariance."""

    tied: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.problems


def _mirrored_axes(group: Group) -> set[str]:
    """Which of "h", "w" the group mirrors (both, and swaps them, if it rotates)."""
    if group.square:
        return {"h", "w"}
    base = torch.arange(12).reshape(3, 4)
    axes = set()
    for g in group.elements:
        out = g(base)
        if out.shape != base.shape:
            continue
        if torch.equal(out, base.flip(-1)) or torch.equal(out, base.flip(-1, -2)):
            axes.add("w")
        if torch.equal(out, base.flip(-2)) or torch.equal(out, base.flip(-1, -2)):
            axes.add("h")
    return axes


def _conv_problems(layer: nn.Module) -> list[str]:
    problems = []
    stride = tuple(layer.stride)
    if stride != (1, 1):
        problems.append(f"stride {stride}: exact only for input sizes N with (N + 2·padding − kernel) "
                        f"divisible by the stride (a stride-2 conv on an even size samples the "
                        f"mirrored grid at the other parity)")
    return problems


def _pad_problem(layer: nn.Module, axes: set[str], rotates: bool) -> str | None:
    left, right, top, bottom = layer.padding
    bad = (("w" in axes and left != right) or ("h" in axes and top != bottom)
           or (rotates and len(set(layer.padding)) > 1))
    return f"asymmetric padding (left, right, top, bottom) = {layer.padding}" if bad else None


_PADS = (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d)


def _pointwise(conv: nn.Conv2d) -> bool:
    """A 1x1 convolution that commutes with every pixel permutation (no stride, no padding)."""
    return (tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1)
            and conv.padding in ((0, 0), "valid"))


def _tied_problems(layer: "TiedConv2d", group: Group) -> list[str]:
    """A layer tied under another group: its kernel must be invariant under every element of
    ``group`` (a d4-tied kernel is c4-invariant; a flip_h-tied one is not d4-invariant)."""
    try:
        indices = group.indices_in(layer.group, layer.kernel_size)
    except ValueError as exc:
        return [f"tied under {layer.group.name}, not {group.name}: {exc}"]
    missing = [k for k, j in enumerate(indices) if j is None]
    if not missing:
        return []
    return [f"tied under {layer.group.name}, whose kernels are not invariant under {group.name}'s "
            f"element(s) {missing}: rebuild it (TiedConv2d.from_conv2d of its expanded weight)"]


def _can_tie(conv: nn.Conv2d, group: Group) -> str | None:
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups}) is not supported by TiedConv2d"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation {tuple(conv.dilation)} is not supported by TiedConv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported by TiedConv2d"
    if conv.padding == "same" and any(k % 2 == 0 for k in conv.kernel_size):
        return (f"padding='same' with an even kernel {tuple(conv.kernel_size)} pads one side more "
                f"than the other, which TiedConv2d's symmetric padding cannot reproduce")
    try:
        kernel_orbits(group, tuple(conv.kernel_size))
    except ValueError as exc:
        return str(exc)
    return _padding_problem(conv.padding, group)


def _padding_problem(padding, group: Group) -> str | None:
    """A layer's padding (ph, pw) under a group that rotates: rotations swap H and W."""
    if group.square and not isinstance(padding, str) and padding[0] != padding[1]:
        return f"padding {tuple(padding)} differs between H and W, which rotations swap"
    return None


def tie_weights(module: nn.Module, group: Group | str, backend: str | None = None) -> TieReport:
    """Replace every nn.Conv2d in ``module`` (in place) by a :class:`TiedConv2d` whose kernel is the
    orbit average of the original, keep every other layer, and report what still breaks exact
    equivariance: convolutions that cannot be tied, strided convolutions, padding that differs
    between sides, transposed convolutions, and parameters or embeddings that look positional.

    Returns a :class:`TieReport`. Layers it cannot see (e.g. a functional F.pad in forward, or a
    Linear over flattened pixels) are not reported: check with symfast.equivariance_error.
    """
    group = get(group)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, nn.Conv2d):  # in place means inside a parent; a bare layer has none
        raise TypeError("module is itself an nn.Conv2d, which cannot be replaced in place: use "
                        "TiedConv2d.from_conv2d(module, group)")
    report = TieReport()
    axes = _mirrored_axes(group)
    # A layer used in several places (or under several parents) is converted once and the same
    # TiedConv2d put in each place, so the weight stays shared; named_modules/named_children
    # without remove_duplicate=False would visit only its first place.
    converted: dict[int, TiedConv2d] = {}
    for parent_name, parent in list(module.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if id(child) in converted:
                setattr(parent, child_name, converted[id(child)])
                report.tied.append(name)
                continue
            if isinstance(child, nn.Conv2d) and _pointwise(child):
                continue  # a 1x1 kernel is its own orbit: it commutes as it is (and keeps its layout)
            if isinstance(child, nn.Conv2d):
                reason = _can_tie(child, group)
                if reason is not None:
                    report.problems.append((name, f"left untied: {reason}"))
                    continue
                tied = converted[id(child)] = TiedConv2d.from_conv2d(child, group, backend=backend)
                converted[id(tied)] = tied  # met again under a shared parent: already counted
                setattr(parent, child_name, tied)
                report.tied.append(name)
                report.problems.extend((name, p) for p in _conv_problems(child))
            elif isinstance(child, TiedConv2d):
                # tied under its own group, which may not rotate: the padding is checked under this one
                padding = _padding_problem(child.padding, group)
                report.problems.extend((name, p) for p in _conv_problems(child) + _tied_problems(child, group)
                                       + ([padding] if padding else []))
            elif isinstance(child, nn.ConvTranspose2d):
                report.problems.append((name, "transposed convolution is not tied"))
            elif isinstance(child, _PADS):
                problem = _pad_problem(child, axes, group.square)
                if problem:
                    report.problems.append((name, problem))
            elif isinstance(child, nn.Embedding) and "pos" in child_name.lower():
                report.problems.append((name, "positional embedding (indexed by absolute position)"))
    for name, param in list(module.named_parameters()) + list(module.named_buffers()):
        leaf = name.rsplit(".", 1)[-1].lower()
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        if "pos" in leaf and not isinstance(owner, nn.Embedding):
            report.problems.append((name, "looks like a positional embedding (indexed by position)"))
    return report
