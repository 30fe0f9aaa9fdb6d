"""What every experiment script does with its results: JSON and a figure, each written atomically
(a reader, or a killed run, never sees half a file)."""
from __future__ import annotations

import json
from pathlib import Path

from symfast._io import atomic_path, atomic_write_text


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG atomically, and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_json(path: Path, payload: dict) -> Path:
    """``payload`` as indented JSON at ``path`` (folders created), atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1))
    return Path(path)


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (--threads 0 reached torch.set_num_threads as a traceback)."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value
