"""Where the bundled data lives (``data/`` at the repository's top level), found from this file, not the cwd.

A clone (or an editable install) has ``data/`` two levels above this file. A non-editable install (``pip install
.``, the Docker image) ships the same folder as the package data ``pymk.data``: ``data/`` next to this file.
``PYMK_DATA_DIR`` comes first (an operator's own copy), a ``data/`` folder in the current directory last.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"
INSTALLED_DATA_DIR = Path(__file__).resolve().parent / "data"  # pyproject.toml: package-dir "pymk.data"


def data_dirs() -> list[Path]:
    """The folders searched for bundled data, first match wins."""
    dirs = []
    if os.environ.get("PYMK_DATA_DIR"):
        dirs.append(Path(os.environ["PYMK_DATA_DIR"]).expanduser())
    dirs += [REPO_DATA_DIR, INSTALLED_DATA_DIR, Path.cwd() / "data"]
    return dirs


def bundled_data(relative: str | Path) -> Path:
    """``data/<relative>`` from the first folder that has it. When none has it the path of the folder this
    installation ships is returned anyway: it is the one to name in the error the caller gets on opening it."""
    for folder in data_dirs():
        candidate = folder / relative
        if candidate.exists():
            return candidate
    return (REPO_DATA_DIR if REPO_DATA_DIR.exists() else INSTALLED_DATA_DIR) / relative
