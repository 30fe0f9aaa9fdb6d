"""Which files in a user's data folder are data."""
from __future__ import annotations

from pathlib import Path


def is_hidden(path: Path, root: Path) -> bool:
    """True when a component of ``path`` below ``root`` starts with "." : editor and OS leftovers
    (.ipynb_checkpoints/, macOS ._name AppleDouble files, .git/) are not samples or classes, and the
    AppleDouble ones are not even images (as Hugging Face datasets' folder loaders skip them)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)
