"""Loading the C++ CPU kernels: the module built by setup.py, or a compile on first use."""
from __future__ import annotations

import functools
import importlib
import logging
import os
from pathlib import Path

logger = logging.getLogger("symfast")

_CSRC = Path(__file__).resolve().parent.parent / "csrc" / "cpu"
_FLAGS = ["-O3", "-fopenmp", "-std=c++17"]

# Why each op's CPU kernel is unavailable, for `symfast info` and error messages.
load_errors: dict[str, str] = {}


def _prebuilt_is_current(module, source: Path) -> bool:
    """A module built in place (editable install) goes stale when its source is edited."""
    built = getattr(module, "__file__", None)
    if built is None or not source.exists():
        return True
    newest_source = max(p.stat().st_mtime for p in [source, *_CSRC.glob("*.h")])
    return Path(built).stat().st_mtime >= newest_source


@functools.lru_cache(maxsize=None)
def load_cpu_kernels(op: str) -> bool:
    """Make the ``symfast::<op>_cpu*`` torch ops available. Returns False (and records why) if
    neither a prebuilt module nor a compiler is available."""
    source = _CSRC / f"{op}.cpp"
    if os.environ.get("SYMFAST_FORCE_JIT") != "1":
        try:
            module = importlib.import_module(f"symfast._cpu_{op}")
            if _prebuilt_is_current(module, source):
                return True
            logger.info("symfast: prebuilt CPU kernel %s is older than its source; recompiling", op)
        except ImportError:
            pass
    if not source.exists():
        load_errors[op] = f"not built and no source at {source}"
        return False
    try:
        from torch.utils.cpp_extension import load

        extra = ["-march=native"] if os.environ.get("SYMFAST_NATIVE") == "1" else []
        logger.warning("symfast: compiling the CPU kernel %r on first use (cached afterwards)", op)
        load(
            name=f"_cpu_{op}",
            sources=[str(source)],
            extra_include_paths=[str(_CSRC)],
            extra_cflags=_FLAGS + extra,
            extra_ldflags=["-fopenmp"],
            is_python_module=True,
            verbose=False,
        )
        return True
    except Exception as exc:  # a missing compiler or ninja must not break the other backends
        load_errors[op] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        logger.warning("symfast: CPU kernel %r unavailable (%s)", op, load_errors[op])
        return False
