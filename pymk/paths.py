"""Where the bundled data lives (``data/`` at the repository's top level), found from this file, not the cwd.

A clone (or an editable install) has ``data/`` two levels above this file. An installed wheel does not ship it
(the graphs and models are data, not code), so the fallbacks are ``PYMK_DATA_DIR`` and a ``data/`` folder in
the current directory (a clone one is running from).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def data_dirs() -> list[Path]:
    """The folders searched for bundled data, first match wins."""
    dirs = []
    if os.environ.get("PYMK_DATA_DIR"):
        dirs.append(Path(os.environ["PYMK_DATA_DIR"]).expanduser())
    dirs += [REPO_DATA_DIR, Path.cwd() / "data"]
    return dirs


def bundled_data(relative: str | Path) -> Path:
    """``data/<relative>`` from the first folder that has it. When none has it the repository's path is returned
    anyway: it is the one to name in the error the caller gets on opening it."""
    for folder in data_dirs():
        candidate = folder / relative
        if candidate.exists():
            return candidate
    return REPO_DATA_DIR / relative
