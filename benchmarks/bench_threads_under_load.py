"""Threads under load: does each symfast CPU kernel collapse when another process holds a core?

    python benchmarks/bench_threads_under_load.py            # writes results/threads_under_load.json
    python benchmarks/bench_threads_under_load.py --quick
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_threads_under_load.py   # *_passive.json

On a machine whose cores are all in use, an OpenMP team of as many threads as cores waits at every
barrier for the thread that shares its core with the other process; code with many small parallel
regions then runs far slower than with fewer threads (CAB-CNN training here: 38 s at 2 threads
against 3.0 s at 1, with one core busy). For every op (the README's size, fp32, cpu backend, forward
and backward where it has one) and for a WT training step, this times 1 and N threads
(N = torch.get_num_threads() at start), with the machine quiet and with one core held by a spinning
process, all in one run, as medians of repeats; each row is the median of several rounds of its
quiet and loaded phases (region counts summed over them). The ratio that matters is
"N threads, loaded / 1 thread, loaded": above 1, using every core hurts once one is busy. The
kernels notice a busy machine themselves and then run their regions on one thread for a while
(csrc/cpu/symfast_module.h); each row also counts, for the N-thread runs, the kernels' regions
that ran on a team, those that found the machine busy, and those that ran alone.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_time, print_table, write_results  # noqa: E402

import symfast.ops as ops  # noqa: E402
from symfast._ext import cpu_team_record, cpu_team_solo_for  # noqa: E402
from symfast.profiling import cases  # noqa: E402


# Ops timed forward + backward (training uses them so); the others run in sampling, forward only.
TRAINED = ("group_norm_silu", "tied_conv2d", "attention_pool", "classifier_select")


def _op_step(op: str):
    """Forward (and backward, for the ops in TRAINED) of ``op`` at the README's size. The backward
    takes a gradient made once and returns the input gradients (torch.autograd.grad), so that no
    torch op of the harness (a loss, .grad accumulation) is timed with the kernel's."""
    case = cases.make_case(op, "readme", torch.float32, "cpu")
    args = [a.detach().requires_grad_() if op in TRAINED and isinstance(a, torch.Tensor)
            and a.is_floating_point() else a for a in case.args]
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    fn = getattr(ops, op)

    def forward():
        out = fn(*args, backend="cpu", **case.kwargs)
        return out[0] if isinstance(out, tuple) else out

    grad_out = torch.randn_like(forward()) if inputs else None

    def step():
        out = forward()
        if inputs:
            torch.autograd.grad(out, inputs, grad_out)
    return case.shape, step


def _train_step():
    from bench_train import bare_step
    from symfast.data.images import digits
    from symfast.nn import EquivariantUNet

    torch.manual_seed(0)
    return "WT 16x16 b64", bare_step(EquivariantUNet(1, 1, (32, 64, 64), "d4"), digits(16).images)


def _spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _forget_the_load() -> None:
    """Start each phase from a clean record: after a busy spell the kernels keep their regions on
    one thread for a back-off of up to a second, and a first region that wakes a sleeping thread
    can look busy and extend it; a quiet phase here measures the quiet steady state."""
    cpu_team_solo_for(0)


def run(repeats: int, rounds: int) -> list[dict]:
    threads = torch.get_num_threads()
    if threads < 2:
        raise SystemExit("needs at least 2 threads (set OMP_NUM_THREADS unset or >= 2)")
    steps = [(op, *_op_step(op)) for op in cases.OPS] + [("train step", *_train_step())]
    rows = []
    for name, shape, step in steps:
        row = {"op": name, "shape": shape}
        times: dict[str, list[float]] = {}
        for _ in range(rounds):  # the machine's own noise moves one phase by 2x: rounds, median
            for load in ("quiet", "loaded"):
                _forget_the_load()
                spinner = _spinner() if load == "loaded" else None
                try:
                    for n in (1, threads):
                        torch.set_num_threads(n)
                        before = cpu_team_record()
                        times.setdefault(f"{load}_t{n}_ms", []).append(
                            median_time(step, repeats, warmup=2) * 1e3)
                        after = cpu_team_record()
                        if n > 1:  # how the kernels' regions ran: on a team, or alone after a busy one
                            for key in ("team_regions", "busy_regions", "solo_regions"):
                                k = f"{load}_t{n}_{key}"
                                row[k] = row.get(k, 0) + after[key] - before[key]
                finally:
                    torch.set_num_threads(threads)
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
        row.update({k: statistics.median(v) for k, v in times.items()})
        row["speedup_quiet"] = row["quiet_t1_ms"] / row[f"quiet_t{threads}_ms"]
        row["loaded_tN_over_t1"] = row[f"loaded_t{threads}_ms"] / row["loaded_t1_ms"]
        rows.append(row)
        print(f"{name}: quiet {row['quiet_t1_ms']:.2f} / {row[f'quiet_t{threads}_ms']:.2f} ms, "
              f"loaded {row['loaded_t1_ms']:.2f} / {row[f'loaded_t{threads}_ms']:.2f} ms "
              f"(1 / {threads} threads)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats, rounds = (5, 1) if args.quick else (15, 5)
    threads = torch.get_num_threads()
    rows = run(repeats, rounds)
    print_table(rows, ["op", "shape", "quiet_t1_ms", f"quiet_t{threads}_ms", "loaded_t1_ms",
                       f"loaded_t{threads}_ms", "speedup_quiet", "loaded_tN_over_t1"])
    policy = os.environ.get("OMP_WAIT_POLICY")  # read by OpenMP at start: record what this run had
    name = "threads_under_load" + (f"_{policy.lower()}" if policy else "")
    path = write_results(name, {"threads": threads, "repeats": repeats, "rounds": rounds,
                                "omp_wait_policy": policy, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
