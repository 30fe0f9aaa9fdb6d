"""``symfast profile``: a few steps of a job under torch.profiler, and where their time went.

Time is split into categories that add up to the wall time of the profiled steps:

- network layers: the network's forward (a ``symfast.profile.network`` range around it, or the
  compiled region of a compiled network) and the autograd backward;
- symfast ops: every public op runs under ``record_function("symfast.<op>")`` (see
  ``symfast._backend.profiled``); compiled code shows the custom ops, ``symfast::<name>``;
- optimiser: ``Optimizer.*`` ranges (torch adds them) and the EMA update;
- data loading: the batch (images, noise, levels) of a training step;
- host overhead/other: the rest of the wall time: Python between ops, loss arithmetic,
  gradient clipping, and on a GPU the time the device waits for the host.

Each event's own time (its duration less its children's) goes to the category of its innermost
marked range, except that a symfast op inside the network counts as a symfast op. On CPU these
are host times of the calling thread (CPU autograd runs there too); on CUDA the device time of
the kernels each range launched.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from symfast import _backend
from symfast._io import atomic_path, atomic_write_text, remove_outputs
from symfast.profiling import costs, timing

log = logging.getLogger(__name__)

CATEGORIES = ("network layers", "symfast ops", "optimiser", "data loading", "host overhead/other")
JOBS = ("sample", "train", "sfbd", "op")
_MARK = "symfast.profile."
_LABELS = {"network": "network layers", "optimiser": "optimiser", "data": "data loading"}
_STEPS = _MARK + "steps"  # around the profiled steps: its own time is host time between ops


# ---- marking what runs --------------------------------------------------------------------------

def label(obj: Any, method: str, category: str) -> None:
    """Run ``obj.<method>`` under the range ``symfast.profile.<category>`` from now on (an
    instance attribute over the class's method: the object keeps its type)."""
    inner = getattr(obj, method)
    name = _MARK + category

    def call(*args, **kwargs):
        with torch.profiler.record_function(name):
            return inner(*args, **kwargs)
    setattr(obj, method, call)


@dataclass
class OpCalls:
    """What the profiled ops were asked to do: per op, calls and the sum of their cost models."""

    calls: dict[str, int] = field(default_factory=dict)
    cost: dict[str, costs.Cost] = field(default_factory=dict)
    dtype: dict[str, str] = field(default_factory=dict)

    def __call__(self, op: str, args: tuple, kwargs: dict) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        cost = costs.call_cost(op, args, kwargs)
        if cost is not None:
            self.cost[op] = self.cost.get(op, costs.Cost(0.0, 0.0)) + cost
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if first is not None:
            self.dtype[op] = timing.dtype_name(first.dtype)


@contextlib.contextmanager
def _collect_op_calls() -> Iterator[OpCalls]:
    calls = OpCalls()
    previous, _backend.op_call_sink = _backend.op_call_sink, calls
    try:
        yield calls
    finally:
        _backend.op_call_sink = previous


# ---- splitting the profile ----------------------------------------------------------------------

def _op_key(name: str) -> str | None:
    """The op row an event belongs to: "symfast.orbit" -> "orbit", "symfast.tied_conv2d.backward"
    stays itself, "symfast::orbit_mean" (a custom op event) -> "symfast::orbit_mean"."""
    if name.startswith(_MARK):
        return None
    if name.startswith("symfast."):
        return name[len("symfast."):]
    if name.startswith("symfast::"):
        return name
    return None


def _category(name: str) -> str | None:
    if name.startswith(_MARK):
        return _LABELS.get(name[len(_MARK):])
    if _op_key(name) is not None:
        return "symfast ops"
    if name.startswith("Optimizer."):
        return "optimiser"
    if name.startswith("autograd::engine::evaluate_function"):
        return "network layers"
    if name.startswith("Torch-Compiled Region"):
        # the jobs compile only the network (train --compile); dynamo drops the range around
        # its forward, and the compiled code of a symfast op inside still names the op
        return "network layers"
    return None


@dataclass
class Split:
    """Seconds per category and per symfast op (row key), from one profile."""

    categories: dict[str, float]
    ops: dict[str, float]
    op_events: dict[str, int]
    wall: float


def split_events(events, wall: float, device: str = "cpu") -> Split:
    """Attribute the profile's events (torch.profiler's FunctionEvents, or anything with
    ``name``, ``cpu_children``, ``cpu_parent``, ``self_cpu_time_total`` in us, ``thread`` and
    ``self_device_time_total``) to categories; ``wall`` seconds is the profiled steps' wall time
    and "host overhead/other" takes what the events leave of it."""
    use_device = device == "cuda"
    cats = {c: 0.0 for c in CATEGORIES}
    ops: dict[str, float] = {}
    counts: dict[str, int] = {}
    roots = [e for e in events if e.cpu_parent is None]
    if not use_device and roots:
        # one thread's host time: the one that ran the steps (inside the range profile_steps
        # opens; else the busiest); CPU autograd runs its backward on it too. Other threads'
        # ranges overlap it in wall time.
        main = next((e.thread for e in roots if e.name == _STEPS), None)
        if main is None:
            busy: dict[int, float] = {}
            for e in roots:
                busy[e.thread] = busy.get(e.thread, 0.0) + e.cpu_time_total
            main = max(busy, key=busy.get)
        roots = [e for e in roots if e.thread == main]

    def own(e) -> float:
        return (e.self_device_time_total if use_device else e.self_cpu_time_total) / 1e6

    stack = [(e, None, None) for e in roots]
    while stack:
        event, category, op = stack.pop()
        name = event.name
        mine = _category(name)
        key = _op_key(name)
        if key is not None and op is None:  # the outermost symfast range names the row
            op = key
            counts[op] = counts.get(op, 0) + 1
        if op is not None:
            category = "symfast ops"
        elif mine is not None:
            category = mine
        seconds = own(event)
        if category is not None:
            cats[category] += seconds
        else:
            cats["host overhead/other"] += seconds
        if op is not None:
            ops[op] = ops.get(op, 0.0) + seconds
        stack.extend((child, category, op) for child in event.cpu_children)
    # what no event covers is host time between ops (CPU) or device idle time (CUDA)
    covered = sum(cats.values())
    cats["host overhead/other"] += max(wall - covered, 0.0)
    return Split(cats, ops, counts, max(wall, covered))


# ---- the report ---------------------------------------------------------------------------------

@dataclass
class Report:
    job: str
    wall_s: float
    steps: int
    categories: list[dict]
    ops: list[dict]
    peak_memory_mb: float
    limits: dict
    machine: dict
    files: dict[str, str] = field(default_factory=dict)
    # the same steps timed again without the profiler, whose own cost the profiled wall holds
    unprofiled_wall_s: float | None = None

    def to_dict(self) -> dict:
        return {"job": self.job, "wall_s": self.wall_s, "unprofiled_wall_s": self.unprofiled_wall_s,
                "steps": self.steps,
                "categories": self.categories, "ops": self.ops,
                "peak_memory_mb": self.peak_memory_mb, "limits": self.limits,
                "machine": self.machine, "files": self.files}


def build_report(job: str, split: Split, calls: OpCalls, limits: timing.MachineLimits,
                 steps: int, peak_mb: float, device: torch.device,
                 medians: dict[str, float] | None = None) -> Report:
    """``medians``: per op, the median seconds of one call timed without the profiler; an op's
    throughput then comes from it rather than from its profiled total (which holds the
    profiler's overhead and any call the machine preempted)."""
    total = split.wall
    categories = [{"category": c, "seconds": s, "share": s / total if total else 0.0}
                  for c, s in split.categories.items()]
    ops = []
    for key, seconds in sorted(split.ops.items(), key=lambda kv: -kv[1]):
        row: dict[str, Any] = {"op": key, "calls": calls.calls.get(key, split.op_events.get(key, 0)),
                               "total_ms": seconds * 1e3, "share_of_run": seconds / total if total else 0.0,
                               "throughput": None, "throughput_unit": "", "share_of_limit": None}
        cost = calls.cost.get(key)
        timed = seconds
        if medians and key in medians and row["calls"]:
            row["median_ms"] = medians[key] * 1e3
            timed = medians[key] * row["calls"]
        # models exist for the public ops' forward calls ("orbit"), not for backward ranges or
        # custom-op events of compiled code, whose arguments the profiler does not hand over
        if cost is not None and timed > 0:
            compute = cost.bound == "compute"
            row["throughput"] = (cost.flops if compute else cost.bytes) / timed / 1e9
            row["throughput_unit"] = "GFLOP/s" if compute else "GB/s"
            floor = limits.floor_seconds(cost.bytes, cost.flops, calls.dtype.get(key, "fp32"))
            row["share_of_limit"] = floor / timed
        ops.append(row)
    return Report(job, total, steps, categories, ops, peak_mb, limits.to_dict(),
                  timing.machine_info(device))


def format_report(report: Report) -> str:
    """The category table and the op table as text."""
    unprofiled = ("" if report.unprofiled_wall_s is None
                  else f" ({report.unprofiled_wall_s * 1e3:.1f} ms without the profiler)")
    lines = [f"symfast profile {report.job}: {report.steps} step(s), {report.wall_s * 1e3:.1f} ms "
             f"profiled{unprofiled}, peak memory {report.peak_memory_mb:.0f} MB",
             f"{'category':<22}{'ms':>10}{'share':>9}"]
    for row in report.categories:
        lines.append(f"{row['category']:<22}{row['seconds'] * 1e3:>10.2f}{100 * row['share']:>8.1f}%")
    if report.ops:
        lines.append("")
        lines.append(f"{'symfast op':<36}{'calls':>6}{'ms':>10}{'of run':>8}{'throughput':>18}"
                     f"{'of limit':>10}")
        for row in report.ops:
            tp = (f"{row['throughput']:.2f} {row['throughput_unit']}" if row["throughput"] is not None
                  else "-")
            share = f"{100 * row['share_of_limit']:.0f}%" if row["share_of_limit"] is not None else "-"
            lines.append(f"{row['op']:<36}{row['calls']:>6}{row['total_ms']:>10.2f}"
                         f"{100 * row['share_of_run']:>7.1f}%{tp:>18}{share:>10}")
        medians = [row for row in report.ops if "median_ms" in row]
        if medians:
            lines.append("throughput and limit share of " + ", ".join(row["op"] for row in medians)
                         + " from the median call timed without the profiler ("
                         + ", ".join(f"{row['median_ms']:.3f} ms" for row in medians) + ")")
    lim = report.limits
    lines.append(f"machine limits measured in this run: copy {lim['copy_GBps']:.1f} GB/s, "
                 + ", ".join(f"{k[5:-7]} GEMM {v:.0f} GFLOP/s" for k, v in lim.items()
                             if k.startswith("gemm_")))
    return "\n".join(lines)


def write_report(report: Report, folder: Path) -> None:
    """table.csv (categories, then ops), profile.json and breakdown.png, each atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["kind", "name", "calls", "ms", "share", "throughput", "throughput_unit",
                     "share_of_limit"])
    for row in report.categories:
        writer.writerow(["category", row["category"], "", f"{row['seconds'] * 1e3:.6g}",
                         f"{row['share']:.6g}", "", "", ""])
    for row in report.ops:
        writer.writerow(["op", row["op"], row["calls"], f"{row['total_ms']:.6g}",
                         f"{row['share_of_run']:.6g}",
                         "" if row["throughput"] is None else f"{row['throughput']:.6g}",
                         row["throughput_unit"],
                         "" if row["share_of_limit"] is None else f"{row['share_of_limit']:.6g}"])
    atomic_write_text(folder / "table.csv", buf.getvalue())
    report.files.update({"table_csv": "table.csv", "table_json": "profile.json",
                         "plot": "breakdown.png", "trace": "trace.json"})
    _plot(report, folder / "breakdown.png")
    # last: profile.json lists the files, so it exists only once they all are this run's
    atomic_write_text(folder / "profile.json", json.dumps(report.to_dict(), indent=1))


def _plot(report: Report, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    left = 0.0
    for row in report.categories:
        ax.barh([0], [100 * row["share"]], left=left,
                label=f"{row['category']} {100 * row['share']:.1f}%")
        left += 100 * row["share"]
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel("share of the profiled wall time (%)")
    ax.set_title(f"symfast profile {report.job}: {report.wall_s * 1e3:.0f} ms over "
                 f"{report.steps} step(s)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


# ---- running a job under the profiler ----------------------------------------------------------

def profile_steps(job: str, step: Callable[[], object], repeats: int, warmup: int,
                  device: torch.device, folder: Path, steps: int | None = None,
                  op: str | None = None) -> Report:
    """Run ``step`` ``warmup`` times, then ``repeats`` times under torch.profiler, then
    ``repeats`` times without it (the unprofiled wall time); write the trace and the report into
    ``folder`` and return the report. ``steps``: the job's steps that ran (default ``repeats``;
    a sampling run is one call of many sampler steps). ``op``: each step is one call of that op,
    whose throughput then comes from the median unprofiled step."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _collect_op_calls() as calls, profile(activities=activities) as prof:
        timing.synchronize(device)
        start = time.perf_counter()
        with torch.profiler.record_function(_STEPS):
            for _ in range(repeats):
                step()
            timing.synchronize(device)
        wall = time.perf_counter() - start
    plain = timing.measure(step, repeats=repeats, warmup=0, device=device)
    split = split_events(prof.events(), wall, device.type)
    # the limits are measured after the profile, so they don't sit in its trace
    limits = timing.measure_limits(device, sorted(set(calls.dtype.values()) | {"fp32"}), quick=True)
    report = build_report(job, split, calls, limits, steps or repeats, _peak_memory_mb(device),
                          device, medians={op: plain.median} if op is not None else None)
    report.unprofiled_wall_s = sum(plain.times)
    remove_outputs(folder, ["profile.json", "table.csv", "breakdown.png", "trace.json"])
    with atomic_path(folder / "trace.json") as tmp:
        prof.export_chrome_trace(str(tmp))
    write_report(report, folder)
    return report


def _peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak allocated in the profiled steps. CPU: the process's peak resident set,
    warm-up and model loading included (the CPU allocator keeps no peak of its own)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _check_positive(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _folder(out: str | os.PathLike) -> Path:
    from symfast.demo import _writable_folder
    return _writable_folder(out)


def _checkpoint(path: str | os.PathLike | None) -> Path:
    from symfast.demo import DEMO_CHECKPOINT
    if path is None:
        return DEMO_CHECKPOINT
    if not Path(path).exists():
        raise ValueError(f"checkpoint={str(path)!r} does not exist (a checkpoint folder or a run "
                         f"folder; omit it to profile the shipped demo model)")
    return Path(path)


# ---- the jobs -----------------------------------------------------------------------------------

def profile_sample(out: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                   steps: int = 4, n: int = 16, sampler: str = "heun", group: str | None = None,
                   ema: int | None = 0, device: str = "cpu", seed: int = 0) -> Report:
    """Profile sampling ``n`` images from ``checkpoint`` (default: the demo's shipped model):
    one warm-up run, then one ``steps``-step run of ``sampler`` under the profiler."""
    from symfast._backend import check_device
    from symfast.samplers import sample
    from symfast.train import load
    from symfast.train.api import image_shape

    _check_positive("steps", steps)
    _check_positive("n", n)
    dev = check_device(device)
    from symfast.samplers.loops import SAMPLERS
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} must be one of {', '.join(sorted(SAMPLERS))}")
    # the checkpoint, ema and group are checked by loading, before the folder is made: a bad
    # argument leaves nothing
    denoiser, cfg = load(_checkpoint(checkpoint), ema=ema, device=dev, group=group)
    folder = _folder(out)
    label(denoiser.model, "forward", "network")
    shape = (n,) + tuple(image_shape(cfg))

    def step():
        with torch.no_grad():
            return sample(denoiser, shape, sampler=sampler, steps=steps, seed=seed,
                          progress=False, device=dev)
    return profile_steps("sample", step, 1, 1, dev, folder, steps=steps)


def profile_sfbd(out: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                 steps: int = 4, n: int = 16, tau: float = 0.5, denoise_steps: int = 40,
                 device: str = "cpu", seed: int = 0) -> Report:
    """Profile SFBD's backward step: denoising ``n`` noisy digits y = x + tau·eps with the
    checkpoint's model (default: the demo's), EDM's Heun PF-ODE on the ``denoise_steps`` grid
    cut at tau; ``steps`` such batches under the profiler after one warm-up."""
    from symfast.data import digits
    from symfast._backend import check_device
    from symfast.samplers import denoise
    from symfast.train import load
    from symfast.train.api import image_shape
    from symfast.train.sfbd import check_tau

    _check_positive("steps", steps)
    _check_positive("n", n)
    _check_positive("denoise_steps", denoise_steps)
    dev = check_device(device)
    denoiser, cfg = load(_checkpoint(checkpoint), device=dev)
    # the model's own noise range, as `symfast sfbd` checks it (a fixed (0, 80) refused taus the
    # model takes and let through ones that failed in the sampler, naming sigma)
    check_tau(tau, denoiser.schedule)
    c, h, _ = image_shape(cfg)
    if c != 1:
        raise ValueError(f"checkpoint={str(checkpoint)!r} makes {c}-channel images; profile sfbd "
                         f"denoises digits (1 channel)")
    clean = digits(h, split="test").images
    if n > len(clean):
        raise ValueError(f"n={n}: profile sfbd denoises digits' test split, which holds "
                         f"{len(clean)} images")
    clean = clean[:n].to(dev)
    folder = _folder(out)
    label(denoiser.model, "forward", "network")
    gen = torch.Generator().manual_seed(seed)
    y = clean + tau * torch.randn(clean.shape, generator=gen).to(dev)

    def step():
        with torch.no_grad():
            return denoise(denoiser, y, tau, steps=denoise_steps)
    return profile_steps("sfbd", step, steps, 1, dev, folder)


TINY_TRAIN = dict(data="digits", image_size=8, channels=(8, 16), equivariance="wt",
                  batch_size=16, lr=1e-3, warmup_steps=0)


_PROFILE_MARK = ".symfast-profile-run"


def profile_train(out: str | os.PathLike, *, config: str | os.PathLike | dict | None = None,
                  steps: int = 4, device: str = "cpu", **overrides: Any) -> Report:
    """Profile ``steps`` training iterations (forward, backward, optimiser, EMA) after two
    warm-up ones. Without ``config`` the run starts from a tiny WT model on 8x8 digits
    (TINY_TRAIN), which ``overrides`` (TrainConfig fields) change. The run's own files (config,
    metrics) go to ``out``/run; no checkpoint is written."""
    from symfast._backend import check_device
    from symfast.train import make_config
    from symfast.train.distributed import World
    from symfast.train.loop import _Run

    _check_positive("steps", steps)
    dev = check_device(device)
    base = dict(TINY_TRAIN) if config is None else {}
    warmup = 2
    # warm-up, profiled and unprofiled steps, and one more than the loop will run: the last
    # one would log and checkpoint
    cfg = make_config(config, **{**base, **overrides, "steps": warmup + 2 * steps + 1,
                                 "out": str(Path(out) / "run"), "resume": "none",
                                 "checkpoint_every": 10**9, "log_every": 10**9,
                                 "sample_every": 0, "progress": False})
    folder = _folder(out)  # after the config's checks: a bad argument leaves nothing
    run_dir = folder / "run"
    if run_dir.exists():
        # a previous profile's run (resume="none" would refuse it), and nothing else
        if not (run_dir / _PROFILE_MARK).exists():
            raise ValueError(f"out={str(out)!r}: {str(run_dir)!r} exists and was not made by "
                             f"'symfast profile train'; give another out folder")
        import shutil
        shutil.rmtree(run_dir)
    run_dir.mkdir()
    from symfast._io import atomic_write_text
    atomic_write_text(run_dir / _PROFILE_MARK, "made by symfast profile train: replaced by the next\n")
    run = _Run(cfg, World(device=dev), None, None)
    label(run.net, "forward", "network")
    for ema in run.ema.models:  # the regulariser's target (equivariance="reg") is an EMA copy
        label(ema, "forward", "network")
    label(run, "_batch", "data")
    label(run.ema, "update", "optimiser")
    run.open_outputs()
    try:
        return profile_steps("train", run.iteration, steps, warmup, dev, folder)
    finally:
        run.close_outputs()


def profile_op(out: str | os.PathLike, op: str, *, size: str = "small", dtype: str = "fp32",
               backend: str | None = None, steps: int = 10, device: str = "cpu") -> Report:
    """Profile ``steps`` calls of one op (``symfast bench all``'s case at ``size``) on
    ``backend`` (default: the fastest here; "compile" for torch.compile of the reference)."""
    from symfast.profiling import cases
    from symfast._backend import check_device
    from symfast.profiling.bench import available_backends

    cases.check_op(op)
    cases.check_size(size)
    if dtype not in timing.DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(timing.DTYPES)}")
    _check_positive("steps", steps)
    dev = check_device(device)
    here = available_backends(dev)
    backend = backend or here[-1]
    if backend not in here:
        raise ValueError(f"backend={backend!r} cannot run on {dev.type} here; choose from "
                         f"{', '.join(here)}")
    folder = _folder(out)
    case = cases.make_case(op, size, timing.DTYPES[dtype], dev)
    fn = case.function(backend)
    op_range = f"symfast.{op}"

    def step():
        # the range names the op for every backend: under torch.compile the op's own range is
        # dropped, so the compiled call is reported here (eager calls report themselves)
        if backend == "compile" and _backend.op_call_sink is not None:
            _backend.op_call_sink(op, case.args, case.kwargs)
        with torch.no_grad(), torch.profiler.record_function(op_range):
            return fn()
    return profile_steps("op", step, steps, 2, dev, folder, op=op)


def profile(job: str, out: str | os.PathLike, **options: Any) -> Report:
    """Run ``symfast profile <job>``: one of "sample", "train", "sfbd", "op"."""
    runners = {"sample": profile_sample, "train": profile_train, "sfbd": profile_sfbd,
               "op": profile_op}
    if job not in runners:
        raise ValueError(f"job={job!r} is not a profiling job; choose from {', '.join(JOBS)}")
    return runners[job](out, **options)
