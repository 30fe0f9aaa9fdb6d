"""Shared benchmark helpers: timing by median of repeats, the machine's copy bandwidth, results IO."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from symfast._io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_ratio(base, fn, repeats: int) -> float:
    """Median over repeats of t(base) / t(fn), the two timed back to back: on the shared 2-core
    machine the other users' load drifts between (and inflates) the separate medians, and slows
    the 2-thread dense conv more than the tied op; a ratio taken from adjacent calls follows the
    same load (measured: separate medians gave 2t ratios from 1.6x to 5x within minutes)."""
    for _ in range(2):
        base(), fn()
    ratios = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 15) -> float:
    """Copy bandwidth in bytes/s (bytes read + bytes written per second) of a large fp32
    tensor copy, measured now, so a kernel's share of it is a ratio from the same run."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), repeats=repeats)
    return 2 * nbytes / seconds


def machine_info() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    atomic_write_text(path, json.dumps({"machine": machine_info(), **payload}, indent=2))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def run_two_process_worker(script: str, flag: str, *args) -> dict:
    """Run ``script flag ARGS OUT`` under torchrun with 2 processes of 1 thread each and return
    the JSON its rank 0 wrote to OUT (a file in a temporary folder both ranks share)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(script).resolve()), flag, *map(str, args), str(out)]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        return json.loads(out.read_text())
