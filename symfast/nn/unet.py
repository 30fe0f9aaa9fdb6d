"""A small diffusion UNet, plain (nn.Conv2d) or exactly equivariant (tied convolutions).

Exactness (see docs/design.md, "Exact equivariance on pixel grids"): every layer commutes with the
group's flips/rotations —
- 3×3 convolutions with G-invariant kernels, stride 1, symmetric zero padding (TiedConv2d);
- 1×1 convolutions, GroupNorm, SiLU, and the time embedding added per channel (they never look at
  where a pixel is);
- 2×2 average pooling down and ×2 nearest upsampling, which map 2×2 blocks onto 2×2 blocks only
  when the size is even at every level: the input size must be divisible by 2^(levels − 1);
- self-attention over pixels without positional embeddings (permuting the pixels permutes the
  output the same way).
So ``EquivariantUNet`` is exactly equivariant at every H, W divisible by 2^(len(channels) − 1)
(H == W for groups with rotations); other sizes raise ValueError. Rounding differs between
``f(g x)`` and ``g f(x)`` only through summation order (~1e-7 relative in fp32).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from symfast._backend import autocast_on, matmul_dtype
from symfast.groups import Group, get
from symfast.nn.tied import TiedConv2d
from symfast.ops import _checks, _dispatch
from symfast.ops.group_norm_silu import group_norm_silu


def _norm(channels: int) -> nn.GroupNorm:
    # Groups of at least 2 channels: a block adds the time embedding per channel right before a
    # GroupNorm, whose mean subtraction takes a group's constant shift out again, so width 8 as 8
    # groups ignored t altogether (width 1 cannot carry it either way). 4 groups of 2 at width 8
    # trained like 8 groups of 1 in a 20-step SGD check (one group of 8 was less stable there).
    if channels % 8 == 0:
        return nn.GroupNorm(8 if channels >= 16 else 4, channels)
    return nn.GroupNorm(1, channels)


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor, backend: str | None,
               shift: torch.Tensor | None = None) -> torch.Tensor:
    """silu(norm(x + shift[:, :, None, None])) in one fused op with ``norm``'s parameters (the
    modules stay, so parameter names and state dicts do not change); backend="reference" is
    the unfused composition. Under bf16 autocast x arrives in bf16 and the parameters stay fp32,
    which the op takes; the shift (the time embedding) is used in x's dtype whichever it has."""
    shift = shift if shift is None or shift.dtype == x.dtype else shift.to(x.dtype)
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, shift=shift,
                           backend=backend)


def _upsample2x_forward(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    out = x.new_empty((b, c, h, 2, w, 2))
    for i in range(2):
        for j in range(2):
            out[:, :, :, i, :, j] = x
    return out.view(b, c, 2 * h, 2 * w)


def _upsample2x_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    b, c, h2, w2 = grad.shape
    rows = grad.reshape(b, c, h2 // 2, 2, w2)
    summed = (rows[:, :, :, 0] + rows[:, :, :, 1]).view(b, c, h2 // 2, w2 // 2, 2)
    return summed[..., 0] + summed[..., 1]


_upsample2x = _dispatch.autograd_function(
    "_Upsample2x", _upsample2x_forward, lambda ctx, inputs, output: None, _upsample2x_backward,
    generate_vmap_rule=True)
_upsample2x.__doc__ = """Nearest 2x upsampling with a hand-written backward. Forward: four strided copies into a
    (B, C, H, 2, W, 2) buffer; backward: the 2x2 block sums as two adds of strided halves (rows,
    then columns). Measured on the development machine (fp32, 2 threads, min of repeats), forward
    / backward in ms: (64, 64, 8, 8) 1.44 / 4.9 with repeat_interleave twice (whose backward is two
    reductions over a length-2 axis) -> 0.70 / 0.17, (64, 64, 4, 4) 0.27 / 1.07 -> 0.14 / 0.07;
    F.interpolate's CPU kernel took ~1 ms for a (4, 64, 16, 16) input against ~0.3 ms."""


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling, equal to F.interpolate(x, scale_factor=2, mode="nearest").
    x: (B, C, H, W) -> (B, C, 2H, 2W)."""
    return _upsample2x(x)


def _bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype,
         add: torch.Tensor | None = None) -> torch.Tensor:
    """(add +) a @ b in ``out_dtype``, computed in matmul_dtype(out_dtype) and rounded once, with
    autocast off (it would cast the widened operands back down)."""
    compute = matmul_dtype(out_dtype, a.device)
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.to(compute), b.to(compute)
        out = torch.bmm(a, b) if add is None else torch.baddbmm(add.to(compute), a, b)
    return out.to(out_dtype)


def _pointwise_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    dtype = (torch.get_autocast_dtype(x.device.type) if autocast_on(x)
             else torch.promote_types(x.dtype, weight.dtype))
    b = x.shape[0]
    w = weight.unsqueeze(0).expand(b, -1, -1)
    add = None if bias is None else bias.view(1, -1, 1).expand(b, -1, 1)
    return _bmm(w, x, dtype, add)


def _pointwise_setup_context(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _pointwise_backward(ctx, grad: torch.Tensor):
    # Under bf16 autocast the forward's product ran in bf16 (grad is bf16) while x and the
    # parameters may be fp32: the products run in grad's dtype, as autocast's baddbmm
    # backward does, and each gradient returns in its input's dtype (batch sums in fp32).
    x, weight = ctx.saved_tensors
    b = x.shape[0]
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = _bmm(weight.t().unsqueeze(0).expand(b, -1, -1), grad, grad.dtype).to(x.dtype)
    if ctx.needs_input_grad[1]:
        gw = _bmm(grad, x.transpose(1, 2), grad.dtype).sum(0, dtype=weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        # summed in fp32 at least (bf16 grads), in fp64 for fp64
        acc = torch.promote_types(grad.dtype, torch.float32)
        gb = grad.sum((0, 2), dtype=acc).to(ctx.bias_dtype)
    return gx, gw, gb


_pointwise = _dispatch.autograd_function("_Pointwise", _pointwise_forward, _pointwise_setup_context,
                                         _pointwise_backward, generate_vmap_rule=True)
_pointwise.__doc__ = """y[b] = bias + W @ x[b], x: (B, C, N), W: (O, C), bias: (O,) or None -> (B, O, N), with the
    backward written out: autograd's baddbmm backward reduced the bias gradient in two sums (over
    pixels, then over the batch of the expanded bias) and ran four more nodes (views, expands).
    Under autocast the product's dtype is autocast's, as for nn.Conv2d; bf16/fp16 products run
    in fp32 on CPUs without arithmetic in them (:func:`symfast._backend.matmul_dtype`)."""


class PointwiseConv2d(nn.Conv2d):
    """A 1×1 convolution (an nn.Conv2d, same parameters and state dict) computed as one batched
    matrix product per call: y[b] = bias + W @ x[b] over the flattened pixels. oneDNN's 1×1 path
    was the slowest layer of a UNet training step on the development machine: forward+backward of
    (64, 96, 16, 16) -> 32 channels took 19.5 ms as nn.Conv2d, 7.2 ms as this baddbmm
    ((64, 96, 32, 32) -> 32: 78 -> 20 ms; (64, 64, 4, 4) -> 192: 2.3 -> 2.1 ms)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = _pointwise(x.reshape(b, c, h * w), self.weight.view(self.out_channels, c), self.bias)
        return y.view(b, self.out_channels, h, w)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, conv3, backend: str | None = None):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), conv3(cin, cout)
        self.time = nn.Linear(temb, cout)
        self.norm2, self.conv2 = _norm(cout), conv3(cout, cout)
        self.skip = PointwiseConv2d(cin, cout) if cin != cout else nn.Identity()
        self.backend = backend

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The skip first: autograd runs the later-recorded branch's backward first, so norm1's
        # input gradient arrives first and the skip's is added into it in place; the other way
        # round (the skip's, a custom Function's output, cannot take it in place) the sum was a
        # new tensor, 2.7 ms per step for the (64, 96, 16, 16) block of the benchmark's UNet.
        skip = self.skip(x)
        h = self.conv1(_norm_silu(self.norm1, x, self.backend))
        # The time embedding, one value per channel (position-free), is added inside the fused
        # op, before norm2: no separate pass over h and its gradient.
        h = self.conv2(_norm_silu(self.norm2, h, self.backend, shift=self.time(emb)))
        return skip + h


class _Attention(nn.Module):
    """Multi-head self-attention over the pixels, with no positional embedding."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = _norm(channels)
        self.qkv = PointwiseConv2d(channels, 3 * channels)
        self.proj = PointwiseConv2d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                             v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def _sinusoidal(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device) / half)
    angles = c_noise.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class UNet(nn.Module):
    """A small diffusion UNet: F(x, t). x: (B, in_channels, H, W), t: (B,) or a scalar
    -> (B, out_channels, H, W). ``channels[l]`` is the width at level l (resolution H / 2^l);
    attention runs at the levels in ``attention_levels`` (default: the lowest) and in the middle.

    Noise conditioning: t is whatever the caller conditions on, embedded as it is (sinusoidal
    features, then an MLP), as EDM's and diffusers' networks do. Inside a
    :class:`symfast.Denoiser` it is ``schedule.model_time(σ)``: ln(σ)/4 for EDM (negative below
    σ = 1), the (fractional) timestep for DDPM (0 at the end), σ for VE. Any finite value is valid.

    ``group=None`` builds plain 3×3 nn.Conv2d layers; a group builds :class:`TiedConv2d` layers
    (see :class:`EquivariantUNet`). H and W must be divisible by 2^(len(channels) − 1).
    ``backend`` picks the kernels of the tied convolutions and of the fused GroupNorm + SiLU
    (:func:`symfast.ops.group_norm_silu`); "reference" runs the latter as plain F.group_norm
    and F.silu (the unfused composition).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = (32, 64, 64),
                 attention_levels: Sequence[int] | None = None, heads: int = 4,
                 group: Group | str | None = None, backend: str | None = None):
        super().__init__()
        channels = tuple(channels)
        if not channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0
                                   for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("heads", heads)):
            _checks.positive_int(name, value)
        _checks.backend_name(backend)
        levels = len(channels)
        attention_levels = (levels - 1,) if attention_levels is None else tuple(attention_levels)
        if any(not 0 <= a < levels for a in attention_levels):
            raise ValueError(f"attention_levels {attention_levels} must lie in [0, {levels})")
        self.group = get(group) if group is not None else None
        self.channels = channels
        self.multiple = 2 ** (levels - 1)
        if self.group is None:
            def conv3(cin, cout):
                return nn.Conv2d(cin, cout, 3, padding=1)
        else:
            def conv3(cin, cout):
                return TiedConv2d(cin, cout, 3, self.group, padding=1, backend=backend)
        temb = 4 * channels[0]
        # sinusoidal features come in cos/sin pairs: an odd width rounds up (1 would give none)
        self.embed_dim = channels[0] + channels[0] % 2
        self.time_mlp = nn.Sequential(nn.Linear(self.embed_dim, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = conv3(in_channels, channels[0])
        self.down = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        cin = channels[0]
        for level, ch in enumerate(channels):
            self.down.append(_ResBlock(cin, ch, temb, conv3, backend))
            self.down_attn.append(_Attention(ch, heads) if level in attention_levels else nn.Identity())
            cin = ch
        self.mid1 = _ResBlock(cin, cin, temb, conv3, backend)
        self.mid_attn = _Attention(cin, heads)
        self.mid2 = _ResBlock(cin, cin, temb, conv3, backend)
        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        for level in reversed(range(levels)):
            ch = channels[level]
            self.up.append(_ResBlock(cin + ch, ch, temb, conv3, backend))
            self.up_attn.append(_Attention(ch, heads) if level in attention_levels else nn.Identity())
            cin = ch
        self.norm_out = _norm(cin)
        self.conv_out = conv3(cin, out_channels)
        self.backend = backend

    def check_size(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] != self.conv_in.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but the network takes "
                             f"{self.conv_in.in_channels}")
        dtype = self.conv_in.weight.dtype
        # under autocast the layers cast for themselves; otherwise torch's error would name a matmul
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the network's parameters are {dtype}: "
                            f"convert one of them (model.to({x.dtype}) or x.to({dtype}))")
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"x has spatial size ({h}, {w}); this UNet pools {len(self.channels) - 1} "
                             f"times, so H and W must be divisible by {self.multiple} (2×2 average "
                             f"pooling is only exactly equivariant on even sizes)")
        if h == self.multiple and w == self.multiple:
            # The bottom level is 1×1: a GroupNorm there with one channel per group normalises a
            # single value (its output is its bias whatever the input; F.group_norm refuses it
            # at batch 1 in training, the kernels would not)
            bottom = (self.down[-1], self.mid1, self.mid_attn, self.mid2, self.up[0])
            single = [m for b in bottom for m in b.modules()
                      if isinstance(m, nn.GroupNorm) and m.num_channels == m.num_groups]
            if single:
                raise ValueError(f"x has spatial size ({h}, {w}): this UNet's bottom level would be "
                                 f"1x1, where its GroupNorm of {single[0].num_channels} channels in "
                                 f"{single[0].num_groups} groups normalises single values; use "
                                 f"inputs of at least {2 * self.multiple}x{2 * self.multiple} or "
                                 f"fewer levels")
        if self.group is not None:
            self.group.check_input(x)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """x: (B, in_channels, H, W), t: the noise conditioning, a scalar or (B,) -> (B, out, H, W)."""
        self.check_size(x)
        if isinstance(t, torch.Tensor):
            if t.is_complex():
                raise TypeError(f"t (the noise conditioning) must be real, got {t.dtype}")
        else:
            _checks.real("t (the noise conditioning)", t)
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"t (the noise conditioning) must be a scalar or ({x.shape[0]},), "
                             f"got {tuple(t.shape)}")
        emb = self.time_mlp(_sinusoidal(t, self.embed_dim).to(x.dtype))
        h = self.conv_in(x)
        skips = []
        for level, (block, attn) in enumerate(zip(self.down, self.down_attn)):
            h = attn(block(h, emb))
            skips.append(h)
            if level < len(self.channels) - 1:
                h = F.avg_pool2d(h, 2)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, (block, attn) in enumerate(zip(self.up, self.up_attn)):
            if i > 0:
                h = upsample2x(h)
            h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
        return self.conv_out(_norm_silu(self.norm_out, h, self.backend))


class EquivariantUNet(UNet):
    """:class:`UNet` with every 3×3 convolution tied to ``group`` (default D4): exactly
    equivariant, F(g x, t) = g F(x, t), at every H, W divisible by 2^(len(channels) − 1) (and
    H == W for groups with rotations) — one network call instead of |G| for frame averaging.
    t is the noise conditioning, as for :class:`UNet`. Inside a Denoiser, pass the same group
    (``Denoiser(net, group="d4")``): the Denoiser sees ``net.group`` and skips frame averaging,
    while stochastic samplers still transform their noise with the state."""

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = (32, 64, 64),
                 group: Group | str = "d4", attention_levels: Sequence[int] | None = None,
                 heads: int = 4, backend: str | None = None):
        if group is None:
            raise ValueError("group must name a group (e.g. 'd4'); use UNet for a plain model")
        super().__init__(in_channels, out_channels, channels, attention_levels, heads, group, backend)
