"""Where data lives: ``$MINI_KD_DATA`` if set, else ``~/.cache/mini_kd``."""

import os
from pathlib import Path


def data_dir() -> Path:
    """The folder for slides, cohorts, features and checkpoints (created on first use)."""
    root = Path(os.environ.get("MINI_KD_DATA") or Path.home() / ".cache" / "mini_kd").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
