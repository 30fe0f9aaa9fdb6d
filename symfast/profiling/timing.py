"""Timing: warm-up, then the median and quantiles of repeats, with the device synchronised.

On CUDA a kernel launch returns before the kernel has run, so a host clock around ``fn()`` would
time the launch; every repeat is bracketed by CUDA events instead (their elapsed time is the
device's), and the device is synchronised before the first and after the last repeat.
"""
from __future__ import annotations

import math
import platform
from pathlib import Path
import statistics
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import torch

from symfast._backend import check_device

Clock = Callable[[], float]


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of ``values`` by linear interpolation between order
    statistics (numpy's default), so q=0.5 is the median."""
    if not values:
        raise ValueError("values must not be empty")
    if not 0 <= q <= 1:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Timing:
    """Seconds of each timed repeat (warm-up calls excluded)."""

    times: tuple[float, ...]
    device: str = "cpu"

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def quantile(self, q: float) -> float:
        return quantile(self.times, q)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: how noisy the repeats were."""
        return (self.quantile(0.75) - self.quantile(0.25)) / self.median if self.median else 0.0

    def summary(self) -> dict:
        return {"median_s": self.median, "q10_s": self.quantile(0.1), "q90_s": self.quantile(0.9),
                "min_s": min(self.times), "repeats": len(self.times)}


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on CPU, where calls are synchronous)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _check_counts(repeats: int, warmup: int) -> None:
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def measure(fn: Callable[[], object], repeats: int = 20, warmup: int = 3,
            device: torch.device | str | None = None, clock: Clock | None = None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    ``device``: where fn's work runs; "cuda" times each repeat with CUDA events. ``clock``: the
    host clock in seconds (default time.perf_counter; tests pass a fake one).
    """
    _check_counts(repeats, warmup)
    device = check_device(device) if device is not None else torch.device("cpu")  # before fn runs
    for _ in range(warmup):
        fn()
    if device.type == "cuda" and clock is None:
        return _measure_cuda(fn, repeats, device)
    clock = clock or time.perf_counter
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return Timing(tuple(times), device.type)


def _measure_cuda(fn: Callable[[], object], repeats: int, device: torch.device) -> Timing:
    with torch.cuda.device(device):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return Timing(tuple(s.elapsed_time(e) / 1e3 for s, e in events), "cuda")


def median_time(fn: Callable[[], object], repeats: int = 20, warmup: int = 3,
                device: torch.device | str | None = None) -> float:
    """Median seconds of ``fn()`` (see :func:`measure`)."""
    return measure(fn, repeats, warmup, device).median


def paired_ratio(base: Callable[[], object], fn: Callable[[], object], repeats: int,
                 device: torch.device | str | None = None, clock: Clock | None = None) -> float:
    """Median over repeats of t(base) / t(fn), the two timed back to back: on a shared machine
    the other users' load drifts between (and inflates) separate medians; a ratio of adjacent
    calls follows the same load (measured here: separate medians gave ratios from 1.6x to 5x
    within minutes)."""
    _check_counts(repeats, 0)
    clock = clock or time.perf_counter
    for _ in range(2):
        base(), fn()
    ratios = []
    for _ in range(repeats):
        synchronize(device)
        t0 = clock()
        base()
        synchronize(device)
        t1 = clock()
        fn()
        synchronize(device)
        t2 = clock()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


# ---- the machine's limits, measured in the same run -------------------------------------------

def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 15,
                   device: torch.device | str | None = None, best: bool = False) -> float:
    """Copy bandwidth in bytes/s (bytes read + bytes written per second) of a large tensor copy,
    measured now, so a kernel's share of it is a ratio from the same run. The default 256 MB is
    well above the L3 cache, so this is memory's bandwidth, not the cache's. ``best``: from the
    fastest repeat instead of the median (see :func:`measure_limits`)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 4 or nbytes % 4:
        raise ValueError(f"nbytes must be a positive multiple of 4 (float32 elements), got {nbytes!r}")
    device = torch.device(device or "cpu")
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), repeats=repeats, warmup=2, device=device)
    return 2 * nbytes / (min(t.times) if best else t.median)


def gemm_throughput(n: int = 1024, dtype: torch.dtype = torch.float32, repeats: int = 10,
                    device: torch.device | str | None = None, best: bool = False) -> float:
    """FLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` (2 n^3 flops), measured now: the compute
    roof for ops whose floor is arithmetic. ``best``: from the fastest repeat."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (the matrices' side), got {n!r}")
    device = torch.device(device or "cpu")
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = measure(lambda: torch.mm(a, b), repeats=repeats, warmup=2, device=device)
    return 2 * n ** 3 / (min(t.times) if best else t.median)


@dataclass
class MachineLimits:
    """What the machine can do, measured in this run: copy bandwidth (bytes/s) and GEMM
    throughput (FLOP/s) per dtype name."""

    copy_bytes_per_s: float
    gemm_flops_per_s: dict[str, float] = field(default_factory=dict)

    def floor_seconds(self, nbytes: float, flops: float, dtype: str) -> float:
        """The roofline floor: the op cannot run faster than moving its bytes or doing its flops.
        The compute roof of bf16/fp16 is the faster GEMM of that dtype and fp32: CPUs without bf16
        arithmetic (AVX2) compute bf16 in fp32, so their slow bf16 GEMM is no roof for a kernel
        that does. fp64 has its own (half fp32's or less): fp32's would understate fp64 ops."""
        keys = (dtype, "fp32") if dtype in ("bf16", "fp16") else (dtype,)
        peaks = [self.gemm_flops_per_s.get(k) for k in keys]
        peak = max((p for p in peaks if p), default=math.inf)
        return max(nbytes / self.copy_bytes_per_s, flops / peak)

    def best_of(self, other: "MachineLimits") -> "MachineLimits":
        """The higher of two measurements of each limit."""
        gemm = {k: max(self.gemm_flops_per_s.get(k, 0.0), other.gemm_flops_per_s.get(k, 0.0))
                for k in {**self.gemm_flops_per_s, **other.gemm_flops_per_s}}
        return MachineLimits(max(self.copy_bytes_per_s, other.copy_bytes_per_s), gemm)

    def to_dict(self) -> dict:
        return {"copy_GBps": self.copy_bytes_per_s / 1e9,
                **{f"gemm_{k}_GFLOPs": v / 1e9 for k, v in self.gemm_flops_per_s.items()}}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # what `bench all` sweeps
# what a profile may meet and measure a GEMM roof for
LIMIT_DTYPES = {**DTYPES, "fp16": torch.float16, "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32", "bf16", "fp16" or "fp64" (other dtypes: "fp32", the roof they are measured by)."""
    return next((k for k, v in LIMIT_DTYPES.items() if v == dtype), "fp32")


def measure_limits(device: torch.device | str | None = None, dtypes: Sequence[str] = ("fp32",),
                   quick: bool = False) -> MachineLimits:
    """Copy bandwidth and GEMM throughput of ``device`` in each of ``dtypes`` (names of
    LIMIT_DTYPES: "fp32", "bf16", "fp16", "fp64").

    A limit is what the machine can do, so each is taken from the fastest repeat: other load on
    a shared machine only slows repeats down, and a median-based roof measured in a busy moment
    put kernels timed in a quiet one above 100% of it (seen here: tied_conv2d at 138%)."""
    if isinstance(dtypes, str) or not all(isinstance(d, str) and d in LIMIT_DTYPES for d in dtypes):
        raise ValueError(f"dtypes must be a list of names from {sorted(LIMIT_DTYPES)}, got {dtypes!r}")
    device = torch.device(device or "cpu")
    big = device.type == "cuda"
    nbytes = (1024 if big else (64 if quick else 256)) * 2**20
    bandwidth = copy_bandwidth(nbytes, repeats=5 if quick else 15, device=device, best=True)
    n = 8192 if big else (512 if quick else 1024)
    gemm = {name: gemm_throughput(n, LIMIT_DTYPES[name], repeats=3 if quick else 10,
                                  device=device, best=True)
            for name in dtypes}
    return MachineLimits(bandwidth, gemm)


# AMD family 25 (0x19) models 0x00-0x0f and 0x20-0x5f are Zen 3, 0x10-0x1f and 0x60-0x7f and
# above Zen 4; family 23 (0x17) is Zen/Zen 2. A VM often names the CPU only "AMD EPYC", so the
# family and model numbers are what tell the machines apart.
_AMD_CORES = ((23, range(0, 0x30), "Zen/Zen+"), (23, range(0x30, 0x100), "Zen 2"),
              (25, range(0, 0x10), "Zen 3"), (25, range(0x10, 0x20), "Zen 4"),
              (25, range(0x20, 0x60), "Zen 3"), (25, range(0x60, 0x100), "Zen 4"),
              (26, range(0, 0x100), "Zen 5"))


@lru_cache(maxsize=None)
def _cpu_model() -> dict:
    """CPU model name, family/model numbers, core name (AMD), widest SIMD ISA, from
    /proc/cpuinfo where Linux has it."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if key.strip() == "flags":
                    break
    except OSError:  # not Linux: platform's coarser answer below
        pass
    flags = set(fields.get("flags", "").split())
    isa = next((i for i in ("avx512f", "avx2", "avx", "sse4_2", "neon", "asimd") if i in flags),
               platform.machine())
    info = {"cpu": fields.get("model name") or platform.processor() or platform.machine(),
            "isa": isa.replace("avx512f", "avx512")}
    if fields.get("cpu family", "").isdigit() and fields.get("model", "").isdigit():
        family, model = int(fields["cpu family"]), int(fields["model"])
        info["cpu_family_model"] = f"{family}/{model:#x}"
        if fields.get("vendor_id") == "AuthenticAMD":
            info["core"] = next((n for fam, models, n in _AMD_CORES if fam == family and model in models),
                                "unknown")
    return info


def _cache_sizes() -> dict:
    """L1d/L2/L3 sizes of CPU 0 from sysfs (Linux), e.g. {"L2": "1024K", "L3": "32768K"}."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            if kind != "Instruction":
                sizes[f"L{level}"] = (index / "size").read_text().strip()
        except OSError:
            continue
    return sizes


def machine_info(device: torch.device | str | None = None) -> dict:
    """What the numbers were measured on: CPU model, core, ISA and caches, threads, torch, and
    the GPU if any."""
    info = {**_cpu_model(), "caches": _cache_sizes(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_label(device: torch.device | str | None = None) -> str:
    """One string for the ``machine`` column, e.g. "AMD EPYC (avx2), 2 threads"."""
    info = machine_info(device)
    core = f" {info['core']}" if info.get("core", "unknown") != "unknown" else ""
    label = f"{info['cpu']}{core} ({info['isa']}), {info['threads']} threads"
    return f"{info['gpu']} / {label}" if "gpu" in info else label
