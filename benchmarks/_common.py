"""Shared benchmark helpers. Timing, the machine's limits and tables live in symfast.profiling
(the one timing module, also behind `symfast profile` and `symfast bench all`); this adds the
benchmarks' results folder and the two-process runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from symfast._io import atomic_write_text
from symfast.profiling.bench import format_table
from symfast.profiling.timing import copy_bandwidth, machine_info, median_time, paired_ratio

__all__ = ["RESULTS", "copy_bandwidth", "machine_info", "machine_kind", "median_time",
           "paired_ratio", "print_table", "run_two_process_worker", "write_results"]

RESULTS = Path(__file__).resolve().parent / "results"


def machine_kind(info: dict) -> str:
    """The folder name of a machine kind under benchmarks/results/machines/: its core and ISA,
    e.g. "zen3-avx2" (the CPU model where the core is unknown)."""
    core = info.get("core") if info.get("core", "unknown") != "unknown" else info.get("cpu", "cpu")
    return "".join(ch for ch in f"{core}-{info.get('isa', 'unknown')}".lower()
                   if ch.isalnum() or ch == "-")


def write_results(name: str, payload: dict, parts: set[str] | None = None,
                  all_parts: set[str] | None = None, subset: str | None = None) -> Path:
    """benchmarks/results/<name>.json: the payload, the machine it was measured on, the date and
    the command (the README's tables name all three beside each figure); the same file also goes
    to benchmarks/results/machines/<kind>/<name>.json, the latest run on each machine kind, from
    which the README's targets table shows every kind measured (issue 16: targets hold on each).
    A run of some of a script's parts (``parts`` short of ``all_parts``: its --only) goes to
    <name>.only-<parts>.json beside the first (git ignores those): the committed files hold one
    whole run, and a partial one written over them lost the other parts' results. ``subset``
    names a run that measured fewer rows some other way (a --quick that drops shapes): it goes to
    <name>.only-<subset>.json the same way (the README's tables read rows it does not have)."""
    if parts is not None and all_parts is not None and not all_parts <= parts:
        subset = '-'.join(sorted(parts))
    if subset is not None:
        name = f"{name}.only-{subset}"
        folders = [RESULTS]
    else:
        folders = [RESULTS, RESULTS / "machines" / machine_kind(machine_info())]
    script = Path(sys.argv[0]).resolve()
    root = RESULTS.parent.parent
    command = " ".join(["python", str(script.relative_to(root) if root in script.parents else script),
                        *sys.argv[1:]])
    stamp = {"machine": machine_info(), "measured": time.strftime("%Y-%m-%d", time.gmtime()),
             "command": command}
    text = json.dumps({**stamp, **payload}, indent=2)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / f"{name}.json", text)
    return folders[0] / f"{name}.json"


def print_table(rows: list[dict], columns: list[str]) -> None:
    print(format_table(rows, columns))


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
