"""Atomic writes: a reader never sees a half-written file or directory, and a failure leaves nothing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmcompose.errors import CheckpointError, MMComposeError


@contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to fill; on success it is renamed to `target`.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `target` is left
    as it was. With `overwrite`, an existing `target` is replaced only once the new one is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise MMComposeError(f"{target} already exists (choose another path or pass --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield temporary
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            try:
                os.replace(temporary, target)
            except BaseException:
                os.replace(old / target.name, target)
                raise
            shutil.rmtree(old)
        else:
            os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write (keeping `target`'s suffix, which writers such as
    matplotlib use to pick a format); on success it is renamed over `target`, on failure removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(target: str | Path, text: str) -> None:
    """Write `text` to a temporary sibling, then rename it over `target`."""
    with atomic_file(target) as temporary:
        temporary.write_text(text)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a checkpoint's or model's config), with one-line errors naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name}")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value
