"""Paths a user gives are made absolute once, where configuration is loaded.

Task processes run with their bundle folder as working directory, so a relative path handed
down to one (a data folder, an output folder) would silently point somewhere else.  Everything
below the configuration layer therefore insists on absolute paths.
"""

from __future__ import annotations

import os
from pathlib import Path


def absolute(path: Path | str, base: Path | str | None = None) -> Path:
    """``path`` as an absolute, normalised path (``~`` expanded; symlinks kept as given), taken
    relative to ``base`` (default: the working directory) when it is relative."""
    expanded = Path(os.path.expanduser(str(path)))
    if not expanded.is_absolute():
        expanded = Path(base if base is not None else os.getcwd()) / expanded
    return Path(os.path.normpath(expanded))


def require_absolute(path: Path | str | None, what: str) -> Path | None:
    """For code below the configuration layer: a relative path here is a bug upstream."""
    if path is None:
        return None
    if not Path(path).is_absolute():
        raise ValueError(f"{what} must be an absolute path, got {str(path)!r}")
    return Path(path)
