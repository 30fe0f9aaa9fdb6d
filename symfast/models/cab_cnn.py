"""CAB-CNN (arXiv 2006.09815; the CAB-CNN paper): a log-mel front end, a small CNN backbone and a
classifier-selection head (K linear classifiers mixed by a softmax gate, symfast::classifier_select),
plus :class:`BaselineCNN`, the same network with one wider (two-layer) head for comparison.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from symfast.ops import _checks
from symfast.ops.classifier_select import check_temperature, classifier_select
from symfast.reference.classifier_select import gate_softmax


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None, n_fft: int | None = None) -> torch.Tensor:
    """Triangular HTK-mel filters (n_freqs, n_mels) for a one-sided spectrum of n_freqs bins
    spanning 0..sample_rate/2: filter m rises from mel point m to m+1 and falls to m+2, peak 1
    (the convention of torchaudio's ``melscale_fbanks(norm=None, mel_scale="htk")``).
    ``n_fft``: the transform's length, whose bin k lies at k·sample_rate/n_fft; an odd n_fft's
    last bin falls short of sample_rate/2 (torchaudio places the bins as if n_fft were even)."""
    _positive_ints(n_freqs=n_freqs, n_mels=n_mels)
    if n_fft is not None:
        _positive_ints(n_fft=n_fft)
        if n_fft // 2 + 1 != n_freqs:
            raise ValueError(f"n_freqs={n_freqs} must be n_fft // 2 + 1 = {n_fft // 2 + 1} for n_fft={n_fft}")
    _checks.finite_number("sample_rate", sample_rate, positive=True)
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={f_min}, "
                         f"f_max={f_max}, sample_rate={sample_rate}")
    if n_freqs < 2:
        raise ValueError(f"need n_freqs >= 2, got {n_freqs}")
    top = sample_rate / 2 if n_fft is None else (n_freqs - 1) * sample_rate / n_fft  # sr/2 when even
    freqs = torch.linspace(0, top, n_freqs, dtype=torch.float64)
    points = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                      dtype=torch.float64))
    lo, centre, hi = points[:-2], points[1:-1], points[2:]
    rising = (freqs[:, None] - lo) / (centre - lo)
    falling = (hi - freqs[:, None]) / (hi - centre)
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0).float()
    empty = int((filters.amax(0) == 0).sum())
    if empty:
        # a filter narrower than the bin spacing catches no bin: its band is the log floor in
        # every clip (torchaudio warns the same way)
        warnings.warn(f"{empty} of the {n_mels} mel filters are all zero: n_mels={n_mels} is too many "
                      f"for a spectrum of n_freqs={n_freqs} bins (raise n_fft or lower n_mels)",
                      UserWarning, stacklevel=2)
    return filters


def _positive_ints(**values) -> None:
    for name, value in values.items():
        _checks.positive_int(name, value)


class LogMel(nn.Module):
    """waveform (B, T) -> log-mel spectrogram (B, 1, n_mels, frames) of the clip scaled to unit
    RMS, so a clip's gain is invisible (also in bands near the ``eps`` floor, where removing the
    mean log-power afterwards would not cancel it)."""

    def __init__(self, sample_rate: int = 8000, n_fft: int = 256, hop_length: int = 128,
                 n_mels: int = 32, eps: float = 1e-6):
        super().__init__()
        self.n_fft, self.hop_length, self.eps = n_fft, hop_length, eps
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("filterbank", mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, n_fft=n_fft),
                             persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        _checks.floating("waveform", waveform)
        _checks.like("waveform", waveform, "the front end's window", self.window, dtype=False)
        if waveform.dim() != 2:
            raise ValueError(f"waveform must be (B, T), got shape {tuple(waveform.shape)}")
        if waveform.shape[1] < self.n_fft // 2 + 1:
            raise ValueError(f"waveform has {waveform.shape[1]} samples; need > n_fft/2 = {self.n_fft // 2}")
        if waveform.shape[0] == 0:
            # torch.stft refuses an empty batch; the empty spectrogram's shape follows from T
            # (center=True pads n_fft // 2 on each side), and it stays in the graph for backward
            padded = waveform.shape[1] + 2 * (self.n_fft // 2)
            frames = 1 + (padded - self.n_fft) // self.hop_length
            return waveform[:, None, None, :1].expand(0, 1, self.filterbank.shape[1], frames)
        # bf16/fp16 in fp32: torch.stft has no FFT for them, and a fixed front end has no
        # reason to round its intermediates; the spectrogram is returned in the waveform's dtype
        dtype = waveform.dtype
        waveform = waveform.to(torch.promote_types(dtype, torch.float32))
        # to the peak first: the square of the RMS would overflow above ~1e154 (1e19 in fp32) and
        # fall under the floor below 1e-8; scaled to the peak, a clip's RMS is at least
        # 1/sqrt(T) and the floor is for a silent clip only
        peak = waveform.abs().amax(1, keepdim=True)
        waveform = waveform / torch.where(peak > 0, peak, 1.0)
        waveform = waveform / waveform.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-8)
        spec = torch.stft(waveform, self.n_fft, self.hop_length, window=self.window.to(waveform.dtype),
                          center=True, return_complex=True)  # (B, n_freqs, frames)
        power = spec.real ** 2 + spec.imag ** 2
        mel = torch.einsum("bft,fm->bmt", power, self.filterbank.to(power.dtype))
        return torch.log(mel + self.eps).unsqueeze(1).to(dtype)


class ConvBackbone(nn.Module):
    """(B, 1, n_mels, frames) -> features (B, channels[-1]): conv3×3–BN–ReLU–maxpool blocks,
    then a global average over frequency and time."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.out_features = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).mean(dim=(2, 3))


def _check_features(h, gate_weight: torch.Tensor) -> None:
    """``h`` is (B, in_features): named here, where the op would blame its gate_weight."""
    _checks.floating("h", h)
    if h.dim() != 2 or h.shape[1] != gate_weight.shape[1]:
        raise ValueError(f"h must be (B, in_features={gate_weight.shape[1]}), got shape {tuple(h.shape)}")


class ClassifierSelect(nn.Module):
    """K linear classifiers on features (B, F) and a softmax gate choosing among them:
    (B, F) -> logits (B, C). Parameters: gate_weight (K, F), gate_bias (K,), weight (K, C, F),
    bias (K, C), initialised like K+1 independent ``nn.Linear`` layers."""

    def __init__(self, in_features: int, n_classes: int, n_classifiers: int = 4,
                 temperature: float = 1.0, backend: str | None = None):
        super().__init__()
        _positive_ints(in_features=in_features, n_classes=n_classes, n_classifiers=n_classifiers)
        check_temperature(temperature)  # at construction rather than at the first forward
        _checks.backend_name(backend)
        bound = 1 / math.sqrt(in_features)

        def param(*shape):
            return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))

        self.gate_weight, self.gate_bias = param(n_classifiers, in_features), param(n_classifiers)
        self.weight = param(n_classifiers, n_classes, in_features)
        self.bias = param(n_classifiers, n_classes)
        self.temperature, self.backend = temperature, backend

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _check_features(h, self.gate_weight)
        return classifier_select(h, self.gate_weight, self.gate_bias, self.weight, self.bias,
                                 temperature=self.temperature, backend=self.backend)

    def gates(self, h: torch.Tensor) -> torch.Tensor:
        """The selection weights (B, K) the head puts on its classifiers."""
        _check_features(h, self.gate_weight)
        return gate_softmax(h @ self.gate_weight.T + self.gate_bias, self.temperature)


class _AudioCNN(nn.Module):
    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, n_mels: int,
                 channels: tuple[int, ...]):
        super().__init__()
        _positive_ints(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels)
        if n_fft < 2:
            raise ValueError(f"n_fft must be >= 2 (a spectrum of at least 2 bins), got {n_fft}")
        if (not isinstance(channels, (tuple, list)) or not channels
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels)):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels!r}")
        self.frontend = LogMel(sample_rate, n_fft, hop_length, n_mels)
        self.backbone = ConvBackbone(channels)

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform (B, T) -> backbone features (B, channels[-1])."""
        # named here: the convolutions would refuse another dtype or device without the name
        _checks.floating("waveform", waveform)
        _checks.like("waveform", waveform, "the model", self.backbone.layers[0].weight)
        return self.backbone(self.frontend(waveform))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform (B, T) -> class logits (B, n_classes)."""
        return self.head(self.features(waveform))


class CABCNN(_AudioCNN):
    """Classifier-attention-based CNN: waveform (B, T) -> logits (B, n_classes)."""

    def __init__(self, n_classes: int, n_mels: int = 32, n_classifiers: int = 4,
                 sample_rate: int = 8000, n_fft: int = 256, hop_length: int = 128,
                 channels: tuple[int, ...] = (16, 32, 64), temperature: float = 1.0,
                 backend: str | None = None):
        super().__init__(sample_rate, n_fft, hop_length, n_mels, channels)
        self.head = ClassifierSelect(self.backbone.out_features, n_classes, n_classifiers,
                                     temperature, backend)


class BaselineCNN(_AudioCNN):
    """The same front end and backbone with one wider head, Linear(F, hidden)–ReLU–Linear(hidden, C)."""

    def __init__(self, n_classes: int, n_mels: int = 32, hidden: int = 128,
                 sample_rate: int = 8000, n_fft: int = 256, hop_length: int = 128,
                 channels: tuple[int, ...] = (16, 32, 64)):
        super().__init__(sample_rate, n_fft, hop_length, n_mels, channels)
        _positive_ints(n_classes=n_classes, hidden=hidden)
        self.head = nn.Sequential(nn.Linear(self.backbone.out_features, hidden),
                                  nn.ReLU(inplace=True), nn.Linear(hidden, n_classes))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
