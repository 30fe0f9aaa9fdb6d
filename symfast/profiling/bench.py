"""``symfast bench all``: every op x backend x dtype x size, timed against the machine's limits
measured in the same run; one CSV, a JSON of the limits, and per-op plots."""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from symfast._backend import check_device
from symfast._io import atomic_path, atomic_write_text, remove_outputs, remove_stale_temporaries
from symfast.profiling import cases, timing

log = logging.getLogger(__name__)

COLUMNS = ["op", "backend", "dtype", "size", "shape", "median_ms", "q10_ms", "q90_ms", "throughput",
           "throughput_unit", "share_of_limit", "bound", "bytes", "flops", "floor_ms", "device",
           "machine", "error"]
DTYPES = tuple(timing.DTYPES)


def available_backends(device: torch.device) -> list[str]:
    """The backends that run on ``device`` here: reference and compile always; cpu where the
    C++ kernels loaded; triton on CUDA with triton installed (never the CPU interpreter: it is a
    test tool, thousands of times slower)."""
    from symfast import _backend

    names = ["reference", "compile"]
    if device.type == "cpu":
        names.append("cpu")
    elif _backend.triton_status()[0]:
        names.append("triton")
    return names


def _check_choice(name: str, values: Sequence[str] | None, allowed: Sequence[str]) -> list[str]:
    if values is None:
        return list(allowed)
    if isinstance(values, str):
        raise TypeError(f"{name} must be a list of names, got the string {values!r}")
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"{name}={list(values)!r}: each must be one of {', '.join(allowed)}")
    return list(values)


def default_out() -> Path:
    """A folder in the current directory: the committed benchmarks/results are refreshed only
    on purpose (benchmarks/readme_tables.py)."""
    return Path.cwd() / "symfast-bench"


def run_case(case: cases.Case, backend: str, dtype: str, limits: timing.MachineLimits,
             device: torch.device, repeats: int, warmup: int) -> dict:
    """One row: the case's median time on ``backend`` and its share of the roofline floor."""
    row = {"op": case.op, "backend": backend, "dtype": dtype, "size": case.size,
           "shape": case.shape, "device": device.type}
    try:
        fn = case.function(backend)
        with torch.no_grad():
            t = timing.measure(fn, repeats=repeats, warmup=warmup, device=device)
    except Exception as exc:  # a backend without this dtype is a row that says so, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    cost = case.cost
    compute = cost.bound == "compute"
    row.update(median_ms=t.median * 1e3, q10_ms=t.quantile(0.1) * 1e3,
               q90_ms=t.quantile(0.9) * 1e3,
               throughput=(cost.flops if compute else cost.bytes) / t.median / 1e9,
               throughput_unit="GFLOP/s" if compute else "GB/s", bound=cost.bound,
               bytes=cost.bytes, flops=cost.flops)
    _share(row, limits)
    return row


def bench_all(out: str | os.PathLike | None = None, *, quick: bool = False,
              device: str | torch.device = "cpu", ops: Sequence[str] | None = None,
              backends: Sequence[str] | None = None, dtypes: Sequence[str] | None = None,
              sizes: Sequence[str] | None = None, repeats: int | None = None,
              progress: bool = True) -> dict:
    """Time every op x backend x dtype x size and write ``out``/bench.csv, limits.json and
    ``out``/plots/<op>.png. ``quick``: the small size only, 3 repeats (under a minute on 2 cores),
    unless ``sizes`` / ``repeats`` are given. A backend named in ``backends`` that cannot run here
    is an error; by default those that can run are timed.

    Returns {"csv": path, "rows": rows, "limits": MachineLimits, "plots": [paths]}.
    """
    dev = check_device(device)
    ops = _check_choice("ops", ops, cases.OPS)
    dtypes = _check_choice("dtypes", dtypes, DTYPES)
    # sizes given win over quick's small size, as repeats given win over its 3 repeats
    sizes = _check_choice("sizes", sizes, cases.SIZES) if sizes is not None else (
        ["small"] if quick else list(cases.SIZES))
    here = available_backends(dev)
    requested = backends is not None  # by default, every backend that runs here
    backends = _check_choice("backends", backends, cases.BACKENDS)
    missing = [b for b in backends if b not in here]
    if missing and requested:
        raise ValueError(f"backends={backends!r}: {missing} cannot run on {dev.type} here "
                         f"(available: {', '.join(here)})")
    backends = [b for b in backends if b in here]
    if repeats is None:
        repeats = 3 if quick else 20
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    from symfast.demo import _writable_folder
    folder = _writable_folder(out if out is not None else default_out())

    limits = timing.measure_limits(dev, dtypes, quick=quick)
    machine = timing.machine_label(dev)
    log.info("machine: %s; copy %.1f GB/s, GEMM %s", machine, limits.copy_bytes_per_s / 1e9,
             ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in limits.gemm_flops_per_s.items()))
    plan = [(op, size, dtype) for op in ops for size in sizes for dtype in dtypes]
    from tqdm.auto import tqdm
    rows = []
    with tqdm(total=len(plan) * len(backends), desc="bench all", unit="case",
              disable=not progress, dynamic_ncols=True) as bar:
        for op, size, dtype in plan:
            case = cases.make_case(op, size, timing.DTYPES[dtype], dev)
            for backend in backends:
                bar.set_postfix_str(f"{op} {size} {dtype} {backend}")
                # compile's first call compiles: one more warm-up than the others
                warmup = 2 if backend == "compile" else 1
                rows.append(dict(run_case(case, backend, dtype, limits, dev, repeats, warmup),
                                 machine=machine))
                bar.update(1)
            del case
    # measured again at the end, the higher of each kept: the load on a shared machine moves
    # during a long run, and the shares are then computed against the better roof
    limits = limits.best_of(timing.measure_limits(dev, dtypes, quick=quick))
    for row in rows:
        _share(row, limits)
    paths = write_results(folder, rows, limits, dev)
    return {"rows": rows, "limits": limits, **paths}


def _share(row: dict, limits: timing.MachineLimits) -> None:
    """(Re)compute a timed row's floor and share of the limit from its cost."""
    if row.get("median_ms") is None:
        return
    floor = limits.floor_seconds(row["bytes"], row["flops"], row["dtype"])
    row.update(share_of_limit=floor / (row["median_ms"] / 1e3), floor_ms=floor * 1e3)


def write_results(folder: Path, rows: list[dict], limits: timing.MachineLimits,
                  device: torch.device) -> dict:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    csv_path = folder / "bench.csv"
    remove_outputs(folder, ["limits.json", "bench.csv", "plots/*.png"])
    if (folder / "plots").is_dir():
        remove_stale_temporaries(folder / "plots")
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(folder / "limits.json", json.dumps(
        {"machine": timing.machine_info(device), "limits": limits.to_dict()}, indent=1))
    return {"csv": csv_path, "plots": plot_rows(rows, folder / "plots")}


def plot_rows(rows: list[dict], folder: Path) -> list[Path]:
    """Per op: median time and share of the limit against size, one line per backend and dtype."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op and r.get("median_ms") is not None]
        if not mine:
            continue
        sizes = [s for s in cases.SIZES if any(r["size"] == s for r in mine)]
        fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
        for key in dict.fromkeys((r["backend"], r["dtype"]) for r in mine):
            line = {r["size"]: r for r in mine if (r["backend"], r["dtype"]) == key}
            xs = [i for i, s in enumerate(sizes) if s in line]
            label = f"{key[0]} {key[1]}"
            ax_t.plot(xs, [line[sizes[i]]["median_ms"] for i in xs], "o-", label=label)
            ax_s.plot(xs, [100 * line[sizes[i]]["share_of_limit"] for i in xs], "o-", label=label)
        for ax, title in ((ax_t, "median time (ms)"), (ax_s, "share of the machine's limit (%)")):
            ax.set_xticks(range(len(sizes)), [f"{s}\n{_shape(mine, s)}" for s in sizes], fontsize=7)
            ax.set_title(title)
            ax.grid(alpha=0.3)
        ax_t.set_yscale("log")
        ax_s.legend(fontsize=7)
        fig.suptitle(op)
        fig.tight_layout()
        path = folder / f"{op}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _shape(rows: list[dict], size: str) -> str:
    return next(r["shape"] for r in rows if r["size"] == size)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as an aligned text table of ``columns`` (floats to 3 significant digits)."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    """``bench all``'s rows as text."""
    return format_table(rows, ["op", "backend", "dtype", "size", "median_ms", "throughput",
                               "throughput_unit", "share_of_limit", "error"])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)[:60]
