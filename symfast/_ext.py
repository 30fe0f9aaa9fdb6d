"""Loading the C++ CPU kernels: the module built by setup.py, or a compile on first use."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from pathlib import Path

from symfast._build import compile_flags, link_flags

logger = logging.getLogger("symfast")

_CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cpu"

# Why each op's CPU kernel is unavailable, for `symfast info` and error messages.
load_errors: dict[str, str] = {}


def _prebuilt_module(op: str, source: Path) -> str | None:
    """Name of the module setup.py built for ``op`` if it exists and is not older than its
    sources. Checked before importing: importing registers the ops, and a stale module's ops
    could not be replaced by a fresh compile in the same process."""
    name = f"symfast._cpu_{op}"
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return None
    if spec is None or spec.origin is None:
        return None
    if source.exists():
        newest_source = max(p.stat().st_mtime for p in [source, *_CSRC.glob("*.h")])
        if Path(spec.origin).stat().st_mtime < newest_source:
            logger.info("symfast: prebuilt CPU kernel %s is older than its source; recompiling", op)
            return None
    return name


@functools.lru_cache(maxsize=None)
def load_cpu_kernels(op: str) -> bool:
    """Make the ``symfast::<op>_cpu*`` torch ops available. Returns False (and records why) if
    neither a prebuilt module nor a compiler is available."""
    source = _CSRC / f"{op}.cpp"
    if os.environ.get("SYMFAST_FORCE_JIT") != "1":
        prebuilt = _prebuilt_module(op, source)
        if prebuilt is not None:
            importlib.import_module(prebuilt)
            return True
    if not source.exists():
        load_errors[op] = f"not built and no source at {source}"
        return False
    try:
        from torch.utils.cpp_extension import load

        logger.warning("symfast: building the CPU kernel %r with torch.utils.cpp_extension "
                       "(compiled on first use, then loaded from its cache)", op)
        load(
            name=f"_cpu_{op}",
            sources=[str(source)],
            extra_include_paths=[str(_CSRC)],
            extra_cflags=compile_flags(),
            extra_ldflags=link_flags(),
            is_python_module=True,
            verbose=False,
        )
        return True
    except Exception as exc:  # a missing compiler or ninja must not break the other backends
        load_errors[op] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        logger.warning("symfast: CPU kernel %r unavailable (%s)", op, load_errors[op])
        return False


_TEAM_FIELDS = ("team_regions", "busy_regions", "solo_regions", "backoff_ns", "solo_left_ns")


def cpu_team_record() -> dict[str, int] | None:
    """How the C++ kernels' parallel regions have run in this process (csrc/cpu/symfast_module.h):
    regions run on a team of threads, those of them that found the machine busy (threads runnable
    but kept off a core by another process), regions since run on the calling thread alone, the
    current back-off and how much of it is left, in ns. None without the CPU kernels."""
    if not load_cpu_kernels("group_average"):
        return None
    import torch

    return dict(zip(_TEAM_FIELDS, torch.ops.symfast.cpu_team_record()))


def cpu_team_solo_for(ms: int) -> None:
    """Run the C++ kernels' parallel regions on the calling thread alone for the next ``ms``
    milliseconds, as they do after finding the machine busy (0: teams again from now on)."""
    if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
        raise ValueError(f"ms must be an int >= 0, got {ms!r}")
    if not load_cpu_kernels("group_average"):
        raise RuntimeError(f"the CPU kernels are not available: {load_errors.get('group_average')}")
    import torch

    torch.ops.symfast.cpu_team_solo_for(ms)


class BusyCores:
    """Says, once, that another process is using the cores, as the C++ kernels saw it: they then
    run their calls on one thread, but torch's own ops at several threads slow down several-fold
    on a shared machine (a WT training step: 560 ms at 2 threads against 179 ms at 1, README).
    A no-op when torch runs one thread or the CPU kernels are not built."""

    def __init__(self) -> None:
        import torch

        self._last = cpu_team_record() if torch.get_num_threads() > 1 else None

    def check(self) -> str | None:
        """The advice, the first time the kernels ran over a quarter of their parallel work
        alone since the previous check; otherwise None."""
        if self._last is None:
            return None
        import torch

        now = cpu_team_record()
        alone = now["solo_regions"] - self._last["solo_regions"]
        teams = now["team_regions"] - self._last["team_regions"]
        self._last = now
        if alone == 0 or alone * 4 <= alone + teams:
            return None
        self._last = None
        return (f"another process is using the cores: symfast's kernels ran {alone} parallel "
                f"regions on one thread since the last log to stay fast, but torch's own ops at "
                f"{torch.get_num_threads()} threads slow down several-fold on a shared machine; "
                f"for this run set OMP_NUM_THREADS=1 (or OMP_WAIT_POLICY=PASSIVE) in the shell")
