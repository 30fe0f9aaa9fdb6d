"""Checkpoints that are never half-written, and a resume that never loads a torn one.

A checkpoint is a folder ``checkpoints/step-<step:09d>/`` holding

- ``tensors.safetensors``: the model, the EMA copies, the optimiser's tensors, RNG states;
- ``state.json``: step, images seen, data position, the optimiser's hyperparameters, the full
  config, the symfast version, and the size and SHA-256 of the tensors file and its tensor names.

It is written into a hidden temporary folder, every file fsynced, then renamed into place (one
atomic rename) and the parent fsynced. Old checkpoints are renamed away before they are deleted,
so an interrupted prune leaves nothing that looks like a checkpoint; a prune only ever removes
checkpoints older than the one just written. Loading verifies state.json's fields, the size, the
hash and the tensor names before anything is used; :func:`latest` skips (with a warning naming
it) any checkpoint that does not verify. A run that branches from an older checkpoint moves the
later ones aside (:func:`set_aside`), so none of them is ever taken for its newest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from symfast._io import atomic_write_bytes, atomic_write_text, fsync_dir

log = logging.getLogger("symfast.train")

FORMAT = "symfast-checkpoint-1"
TENSORS = "tensors.safetensors"
STATE = "state.json"
_NAME = re.compile(r"^step-(\d{9})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, torn, corrupt, or of another config."""


@dataclass
class Checkpoint:
    """A verified checkpoint: its folder, its JSON state and its tensors (CPU)."""

    path: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def path_for(run_dir: str | os.PathLike, step: int) -> Path:
    """The folder of checkpoint ``step`` of a run."""
    return checkpoint_dir(run_dir) / f"step-{step:09d}"


def save(run_dir: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor],
         state: dict[str, Any], keep: int | None = None) -> Path:
    """Write checkpoint ``step`` atomically under ``run_dir/checkpoints`` and keep it and the
    newest ``keep - 1`` older ones (all if None); checkpoints of later steps are not this
    writer's to prune. Returns its folder."""
    final = write_folder(path_for(run_dir, step), tensors, dict(state, step=int(step)))
    if keep is not None:
        older = [p for p in list_checkpoints(run_dir) if step_of(p) < step]
        for old in older[:max(len(older) - (keep - 1), 0)]:
            _remove(old)
    return final


def write_folder(final: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write a checkpoint folder ``final`` (tensors + state.json) atomically: built in a hidden
    sibling folder, fsynced, renamed into place (replacing an older checkpoint folder of the same
    name; anything else already at ``final`` is refused, never deleted)."""
    from safetensors.torch import save as safetensors_bytes

    if final.exists() and not (final.is_dir() and {p.name for p in final.iterdir()} <= {TENSORS, STATE}):
        raise ValueError(f"{str(final)!r} exists and is not a checkpoint folder (tensors.safetensors "
                         f"+ state.json only); refusing to replace it")
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # safetensors needs contiguous, unshared storage
        blob = safetensors_bytes({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()})
        atomic_write_bytes(tmp / TENSORS, blob)
        full_state = dict(state, format=FORMAT, tensors={
            "file": TENSORS, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
            "names": sorted(tensors)})
        atomic_write_text(tmp / STATE, json.dumps(full_state, indent=1, sort_keys=True))
        if final.exists():  # the same step written again (a resumed run that re-reached it)
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _remove(path: Path) -> None:
    """Rename away, then delete: a kill in between leaves a hidden folder, not a torn checkpoint."""
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is the folder name of a run's checkpoint (step-NNNNNNNNN)."""
    return bool(_NAME.match(name))


def step_of(path: Path) -> int:
    """The step of a checkpoint folder, from its name."""
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run, oldest first (by step); hidden temporary folders are not
    listed."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if p.is_dir() and is_checkpoint_name(p.name))
    return found


def clean_leftovers(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary and trash folders a killed writer left behind; returns them. Only
    the process that writes checkpoints calls this, before it writes any."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.name.startswith((".step-", ".trash-"))]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return leftovers


def later_than(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """The checkpoint folders of a run after step ``step``, oldest first."""
    return [p for p in list_checkpoints(run_dir) if step_of(p) > step]


def branch_folder(run_dir: str | os.PathLike, step: int) -> Path:
    """A new folder name, ``run_dir/abandoned-after-step-<step>-<UTC time>``, for what a run
    that branches from step ``step`` sets aside."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    folder = Path(run_dir) / f"abandoned-after-step-{step:09d}-{stamp}"
    while folder.exists():  # another branch within the same second
        folder = folder.with_name(f"{folder.name}-{uuid.uuid4().hex[:4]}")
    return folder


def set_aside(run_dir: str | os.PathLike, step: int, folder: Path) -> list[Path]:
    """Move the checkpoints of steps after ``step`` out of ``run_dir/checkpoints`` into
    ``folder/checkpoints``, one atomic rename each: a run that continues from ``step`` must never
    take them for its newest, nor prune its own checkpoints for them, and they are the user's to
    keep or delete. Returns their new paths."""
    target = folder / "checkpoints"
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in later_than(run_dir, step):
        os.replace(path, target / path.name)
        moved.append(target / path.name)
    fsync_dir(target)
    fsync_dir(checkpoint_dir(run_dir))
    return moved


# The fields of state.json that every checkpoint has (a table's entries follow it) ...
_FIELDS = {"step": int, "config": dict, "tensors": dict, "tensors.file": str,
           "tensors.bytes": int, "tensors.sha256": str, "tensors.names": list}
# ... and those a training run writes besides, which resuming needs (an exported checkpoint has
# none of them): a checkpoint lacking one cannot be resumed, so it is skipped as a torn one is.
_TRAINING_FIELDS = {"nimg": int, "nonfinite_skipped": int, "optimizer": dict,
                    "optimizer.param_groups": list, "optimizer.scalars": dict, "rng": dict,
                    "data": dict, "lr": (int, float), "world_size": int}


def _check_state(path: Path, state: Any, training: bool = False) -> None:
    """CheckpointError unless ``state`` (a parsed state.json) has the fields loading reads (and,
    with ``training``, resuming), of the right types: valid JSON edited or written by something
    else must be refused as a torn file is, not crash its reader with a KeyError."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a symfast checkpoint "
                              f"(format {state.get('format') if isinstance(state, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    if training and "exported_from" in state:
        raise CheckpointError(f"checkpoint {str(path)!r} is an exported checkpoint (EMA weights "
                              f"only, no optimiser state) and cannot be resumed; start a run from "
                              f"it with init_from instead")
    for name, kind in (_FIELDS | _TRAINING_FIELDS if training else _FIELDS).items():
        table, key = (state, name) if "." not in name else (state.get(name.split(".")[0]),
                                                              name.split(".")[1])
        if not isinstance(table, dict):
            continue  # its table's own entry names it
        value = table.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise CheckpointError(f"checkpoint {str(path)!r}: {STATE} has "
                                  f"{'no ' + name if value is None else f'{name}={value!r}'} "
                                  f"(expected {expected}); not a complete symfast "
                                  f"{'training ' if training else ''}checkpoint")
    meta = state["tensors"]
    if not all(isinstance(n, str) for n in meta["names"]):
        raise CheckpointError(f"checkpoint {str(path)!r}: {STATE}'s tensors.names must be a list "
                              f"of strings")


def load(path: str | os.PathLike, training: bool = False) -> Checkpoint:
    """Load and verify one checkpoint folder (or its state.json / tensors file); with
    ``training``, also that it holds what resuming a run reads (optimiser state, counters).
    Raises CheckpointError naming the path and what is wrong."""
    from safetensors.torch import load as safetensors_load

    path = Path(path)
    if path.is_file() and path.name in (STATE, TENSORS):
        path = path.parent
    if path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is a file, not a checkpoint folder (or "
                              f"its {STATE} / {TENSORS}) or a run folder")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {STATE}: not a symfast checkpoint, "
                              f"or a torn one") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: {STATE} is corrupt ({exc})") from None
    _check_state(path, state, training)
    meta = state["tensors"]
    try:
        blob = (path / meta["file"]).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} is missing {meta['file']}") from None
    if len(blob) != meta["bytes"] or hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"checkpoint {str(path)!r}: {meta['file']} is truncated or corrupt "
                              f"({len(blob)} bytes, expected {meta['bytes']}, or its hash differs)")
    tensors = safetensors_load(blob)
    missing = sorted(set(meta["names"]) - set(tensors))
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} is missing tensors {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
    return Checkpoint(path, state, tensors)


def load_weights(module: torch.nn.Module, ckpt: Checkpoint, prefix: str) -> None:
    """Load the checkpoint's tensors named ``prefix``* into ``module``; ValueError naming the
    checkpoint when there are none, or when they do not fit the module (names or shapes)."""
    weights = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"checkpoint {ckpt.path} has no weights under {prefix!r}")
    try:
        module.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {ckpt.path} does not fit the model: {exc}") from None


def latest(run_dir: str | os.PathLike, training: bool = False) -> Checkpoint | None:
    """The newest checkpoint of a run that loads and verifies (``training``: as :func:`load`);
    torn or corrupt ones are skipped with a warning naming them. None if there is none."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load(path, training)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
    return None


def resolve(spec: str | os.PathLike, training: bool = False) -> Checkpoint:
    """A checkpoint from a path: a checkpoint folder or file, or a run folder (its newest valid
    checkpoint); ``training``: one a run can resume (see :func:`load`)."""
    path = Path(spec)
    if path.name == "checkpoints" and path.is_dir():
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir() and not (path / STATE).exists() and checkpoint_dir(path).is_dir():
        found = latest(path, training)
        if found is None:
            raise CheckpointError(f"run folder {str(path)!r} holds no valid checkpoint")
        return found
    return load(path, training)
