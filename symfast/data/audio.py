"""Audio classification data: a seeded synthetic set, and a loader for a folder of WAV files.

Both give :class:`AudioClips`: mono float32 waveforms (N, T) in [-1, 1], int64 labels (N,),
the class names and the sample rate.
"""
from __future__ import annotations

import io
import math
import wave
from dataclasses import dataclass
from pathlib import Path

import torch

from symfast._io import atomic_write_bytes
from symfast.data._paths import is_hidden
from symfast.ops import _checks
from symfast.philox import seeded_generator

SYNTHETIC_CLASSES = ("tone", "chirp_up", "chirp_down", "am", "fm",
                     "white_noise", "pink_noise", "brown_noise")
_MAX_HZ = 3000  # the highest frequency any class draws (a chirp's end); see _signal


@dataclass
class AudioClips(torch.utils.data.Dataset):
    """waveforms: (N, T) float32; labels: (N,) int64 indices into ``classes``."""

    waveforms: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    sample_rate: int

    def __len__(self) -> int:
        return self.waveforms.shape[0]

    def __getitem__(self, i):
        return self.waveforms[i], self.labels[i]


def _finite_pair(value) -> bool:
    """(lo, hi): two finite real numbers with lo <= hi."""
    return (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in value) and value[0] <= value[1])


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, 1, generator=gen, dtype=torch.float64)


def _coloured_noise(gen: torch.Generator, n: int, length: int, exponent: float) -> torch.Tensor:
    """Noise with power spectrum ∝ 1/f^exponent (0 white, 1 pink, 2 brown), unit RMS."""
    white = torch.randn(n, length, generator=gen, dtype=torch.float64)
    spec = torch.fft.rfft(white, dim=-1)
    freqs = torch.arange(spec.shape[-1], dtype=torch.float64).clamp_min(1.0)
    noise = torch.fft.irfft(spec * freqs ** (-exponent / 2), n=length, dim=-1)
    noise = noise - noise.mean(-1, keepdim=True)
    return noise / noise.pow(2).mean(-1, keepdim=True).sqrt()


def _signal(name: str, gen: torch.Generator, n: int, t: torch.Tensor) -> torch.Tensor:
    """n clips of one class on the time grid t (T,) in seconds, before gain/onset/noise."""
    duration = float(t[-1]) + float(t[1] - t[0])
    if name == "tone":
        return torch.sin(2 * math.pi * _uniform(gen, n, 200, 2000) * t)
    if name in ("chirp_up", "chirp_down"):
        lo, hi = _uniform(gen, n, 200, 800), _uniform(gen, n, 1500, _MAX_HZ)
        f0, f1 = (lo, hi) if name == "chirp_up" else (hi, lo)
        # linear chirp: phase = 2π (f0 t + (f1 − f0) t² / (2 duration))
        return torch.sin(2 * math.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * duration)))
    if name == "am":
        carrier, rate = _uniform(gen, n, 300, 2000), _uniform(gen, n, 4, 12)
        depth = _uniform(gen, n, 0.7, 1.0)
        return (1 + depth * torch.sin(2 * math.pi * rate * t)) / 2 * torch.sin(2 * math.pi * carrier * t)
    if name == "fm":
        carrier, rate = _uniform(gen, n, 600, 2000), _uniform(gen, n, 3, 10)
        deviation = _uniform(gen, n, 150, 400)  # Hz: several mel bands either side of the carrier
        return torch.sin(2 * math.pi * carrier * t + deviation / rate * torch.sin(2 * math.pi * rate * t))
    exponent = {"white_noise": 0.0, "pink_noise": 1.0, "brown_noise": 2.0}[name]
    return _coloured_noise(gen, n, t.shape[0], exponent)


def synthetic_audio(n_per_class: int = 50, sample_rate: int = 8000, duration: float = 0.5,
                    classes: tuple[str, ...] | list[str] = SYNTHETIC_CLASSES, seed: int = 0,
                    snr_db: tuple[float, float] = (10.0, 30.0),
                    gain: tuple[float, float] = (0.1, 0.9),
                    max_onset: float = 0.3) -> AudioClips:
    """A seeded synthetic audio classification set (tones, chirps, AM/FM, noise colours).

    Every clip gets a random gain, a random onset (silence, apart from the background, for the
    first ``U(0, max_onset)`` of the clip) and white background noise at a random SNR in
    ``snr_db``. Classes are interleaved (label i % n_classes) and the whole set depends only on
    ``seed``. Returns :class:`AudioClips` with waveforms (n_per_class·n_classes, T).
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive int, got {n_per_class!r}")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate <= 2 * _MAX_HZ:
        raise ValueError(f"sample_rate must be an int > {2 * _MAX_HZ} Hz (the classes reach {_MAX_HZ} Hz; "
                         f"at or below twice that they alias), got {sample_rate!r}")
    _checks.finite_number("duration", duration, positive=True)  # seconds
    if not _finite_pair(snr_db):
        raise ValueError(f"snr_db must be (lo, hi), two finite numbers with lo <= hi, got {snr_db!r}")
    length = int(round(duration * sample_rate))
    if not length >= 64:
        raise ValueError(f"duration={duration} s gives {length} samples at {sample_rate} Hz; need >= 64")
    classes = list(classes)
    unknown = [c for c in classes if c not in SYNTHETIC_CLASSES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct names from {SYNTHETIC_CLASSES}, got {classes}")
    if isinstance(max_onset, bool) or not isinstance(max_onset, (int, float)) or not 0 <= max_onset < 1:
        raise ValueError(f"max_onset must be a fraction of the clip in [0, 1), got {max_onset!r}")
    if not (_finite_pair(gain) and 0 < gain[0] and gain[1] <= 1):
        raise ValueError(f"gain must be (lo, hi) with 0 < lo <= hi <= 1, got {gain!r}")
    gen = seeded_generator(seed)
    t = torch.arange(length, dtype=torch.float64) / sample_rate
    n_classes = len(classes)
    waves = torch.empty(n_per_class * n_classes, length, dtype=torch.float64)
    for label, name in enumerate(classes):
        sig = _signal(name, gen, n_per_class, t)
        sig = sig / sig.pow(2).mean(-1, keepdim=True).sqrt()  # unit RMS before gain and SNR
        onset = (_uniform(gen, n_per_class, 0, max_onset) * length).long()
        sig = sig * (torch.arange(length) >= onset)
        snr = _uniform(gen, n_per_class, *snr_db)
        noise = torch.randn(n_per_class, length, generator=gen, dtype=torch.float64)
        clip = sig + noise * 10 ** (-snr / 20)
        clip = clip / clip.abs().amax(-1, keepdim=True) * _uniform(gen, n_per_class, *gain)
        waves[label::n_classes] = clip
    labels = torch.arange(n_classes).repeat(n_per_class)
    return AudioClips(waves.float(), labels, classes, sample_rate)


_PCM_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """A PCM WAV file (8/16/24/32-bit, any channel count) -> (mono float32 (T,) in [-1, 1],
    sample rate). Channels are averaged."""
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{path} is not a PCM WAV file wave can read: {exc}") from exc
    if width not in (1, 2, 3, 4):
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    if len(raw) % (width * channels):
        raise ValueError(f"{path} is cut off mid-sample ({len(raw)} bytes of {width}-byte samples "
                         f"in {channels} channels)")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)
    if width == 3:  # 24-bit little-endian: widen to int32 by placing the bytes high
        b = data.reshape(-1, 3).to(torch.int32)
        samples = ((b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)).double() / 2.0 ** 31
    else:
        samples = data.view(_PCM_DTYPES[width]).double()
        samples = (samples - 128) / 128 if width == 1 else samples / 2.0 ** (8 * width - 1)
    return samples.reshape(-1, channels).mean(1).float(), rate


def write_wav(path: str | Path, waveform: torch.Tensor, sample_rate: int) -> None:
    """Write a mono waveform (T,) in [-1, 1] as 16-bit PCM, atomically (a failed write leaves an
    existing file as it was). Sample k is round(x·32768) clipped to [−32768, 32767], the scale
    :func:`read_wav` divides by, so reading a file and writing it again changes no sample."""
    if not isinstance(waveform, torch.Tensor) or waveform.dim() != 1:
        got = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise ValueError(f"waveform must be a (T,) tensor, got {got}")
    if not waveform.is_floating_point():
        raise TypeError(f"waveform must be a real floating tensor, got {waveform.dtype}")
    if not bool(torch.isfinite(waveform).all()):
        raise ValueError("waveform holds non-finite values")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or not 0 < sample_rate < 2**32:
        raise ValueError(f"sample_rate must be a positive int below 2^32, got {sample_rate!r}")
    pcm = (waveform.detach().double() * 32768).round().clamp(-32768, 32767).to(torch.int16)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.numpy().tobytes())
    atomic_write_bytes(path, buffer.getvalue())


def load_wav_folder(root: str | Path, num_samples: int | None = None) -> AudioClips:
    """Load ``root/<class>/*.wav`` (one sub-folder per class, sorted by name) as AudioClips.
    Hidden folders and files (name starting with ".") are left out.

    Every file must have the same sample rate (no resampling is done). Clips are cut or
    zero-padded at the end to ``num_samples`` (default: the longest clip).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root={str(root)!r} is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p, root))
    if not class_dirs:
        raise ValueError(f"root={str(root)!r} has no class sub-folders")
    clips, labels, rate = [], [], None
    for label, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".wav" and not is_hidden(p, folder))
        if not files:
            raise ValueError(f"class folder {str(folder)!r} holds no .wav files")
        for path in files:
            samples, file_rate = read_wav(path)
            if rate is None:
                rate = file_rate
            elif file_rate != rate:
                raise ValueError(f"{path} has sample rate {file_rate} Hz but earlier files have "
                                 f"{rate} Hz; resample the folder to one rate first")
            clips.append(samples)
            labels.append(label)
    if num_samples is None:
        num_samples = max(c.shape[0] for c in clips)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    waves = torch.zeros(len(clips), num_samples)
    for i, c in enumerate(clips):
        n = min(num_samples, c.shape[0])
        waves[i, :n] = c[:n]
    return AudioClips(waves, torch.tensor(labels), [d.name for d in class_dirs], rate)
