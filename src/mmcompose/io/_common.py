"""Helpers shared by the loaders: resolve a path safely and turn library failures into one-line messages."""

from __future__ import annotations

import os
from pathlib import Path

from mmcompose.errors import InputError

PathLike = str | os.PathLike[str]


def one_line(exc: BaseException, limit: int = 200) -> str:
    """Squash a library exception into one short line, because the CLI prints exactly one line per error."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_file(source: PathLike, kind: str) -> Path:
    """Return `source` as a Path to a non-empty regular file, or raise InputError saying why it is not.

    Checked up front so a missing path, a directory or a FIFO (which would block a decoder forever) gets a
    clear message instead of whatever the decoding library makes of it.
    """
    path = Path(source)
    try:
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if path.is_dir():
            raise InputError(f"{path}: is a directory, expected a {kind} file")
        if not path.is_file():
            raise InputError(f"{path}: not a regular file, expected a {kind} file")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: empty file, expected a {kind} file")
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot access file ({one_line(exc)})") from None
    return path
