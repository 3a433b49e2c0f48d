"""Can this output be written? One check for every command's output file or folder, made before any work.

``check_output_file`` and ``check_output_dir`` raise a one-line ``OutputPathError`` (a ``UserError``: the CLI
prints it and exits 2) when the path is certain to fail later: a folder where a file is wanted or the other
way round, a file in the way of a parent folder, or a folder this user may not write in. They create nothing:
a command that fails on another argument afterwards leaves no empty folder behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from model.errors import UserError


class OutputPathError(UserError, ValueError):
    """An output path that cannot be written; the message names the option and says why."""


def check_output_file(path: str | Path, option: str = "--output") -> Path:
    """``path`` can be written as a file (replaced if it is one already); returns it as a ``Path``."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; give a file name (e.g. {path / 'NAME'})")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {path}: the file exists and cannot be replaced (permission denied)")
    _check_parent(path, option)
    return path


def check_output_dir(path: str | Path, option: str = "--output") -> Path:
    """``path`` is a writable folder or can be made one; returns it as a ``Path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path}: is a file, not a folder; give a folder (new or existing)")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputPathError(f"{option} {path}: cannot write in this folder (permission denied)")
        return path
    _check_parent(path, option)
    return path


def _check_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` is a folder this user can create entries in."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: cannot write in {ancestor} (permission denied)")
