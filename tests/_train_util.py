"""Helpers of the training tests: run `symfast train` in a subprocess (plain or under torchrun),
read a run's final checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from symfast.train import checkpoint

# A tiny run: a few ms per step, checkpoints of about a megabyte.
TINY = ["--data", "gmm-d4", "--image-size", "8", "--channels", "16,32", "--batch-size", "8",
        "--log-every", "1", "--no-progress", "--warmup-steps", "3", "--lr", "1e-3"]
# A tinier one on the 8x8 digits, for the commands' own tests.
DIGITS = ["--data", "digits", "--image-size", "8", "--channels", "8,16", "--heads", "2",
          "--batch-size", "8", "--no-progress"]


def child_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env.pop("WORLD_SIZE", None)
    return env


def train_command(out: Path, steps: int, *extra: str, nproc: int = 1) -> list[str]:
    return symfast_command("train", *TINY, "--steps", str(steps), "--out", str(out), *extra,
                           nproc=nproc)


def symfast_command(*args: str, nproc: int = 1) -> list[str]:
    """`python -m symfast ARGS`, under torchrun with ``nproc`` CPU processes when nproc > 1."""
    args = ("-m", "symfast", *args)
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", *args]


def run_train(out: Path, steps: int, *extra: str, nproc: int = 1, check: bool = True,
              timeout: float = 300) -> subprocess.CompletedProcess:
    return run_command(train_command(out, steps, *extra, nproc=nproc), check, timeout)


def run_command(command: list[str], check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``command`` (one of the commands above) to its end, its output captured."""
    proc = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{command[1:4]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# Runs `symfast ARGS` and SIGKILLs it (itself, a real kill) inside the atomic write of the first
# file whose path holds MARKER, after creating the temporary that atomic_path would leave there.
_KILL_IN_WRITE = """
import os, signal, sys
import symfast._io, symfast.data.images
real = symfast._io.atomic_path
marker = sys.argv[1]
def killed_inside(path):
    if marker in str(path):
        (path.parent / ("." + path.name + ".abcd1234.tmp")).write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path)
symfast.data.images.atomic_path = killed_inside
from symfast.cli import main
sys.exit(main(sys.argv[2:]))
"""


def sigkill_inside_write(marker: str, *args: str) -> subprocess.CompletedProcess:
    """`symfast ARGS`, killed with SIGKILL inside its write of the first image file whose path
    holds ``marker`` (a sample grid: symfast.data.images writes them)."""
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_WRITE, marker, *args], env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, f"expected a SIGKILL, got {proc.returncode}:\n{proc.stderr}"
    return proc


def final_tensors(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The newest checkpoint's tensors (RNG state aside) and state."""
    found = checkpoint.latest(run_dir)
    assert found is not None, f"no checkpoint in {run_dir}"
    return {k: v for k, v in found.tensors.items() if not k.startswith("rng.")}, found.state


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"tensors differ: {differing[:8]}"


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def process_tree(pid: int) -> list[int]:
    """``pid`` and its living descendants, parents before children (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # the name may hold spaces
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree = [pid]
    for parent in tree:
        tree.extend(children.get(parent, []))
    return tree


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def sigkill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every process under it, the launcher first so it starts no more
    (torchrun starts each rank in a session of its own: killing its group leaves them running)."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
