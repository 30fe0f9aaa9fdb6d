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
