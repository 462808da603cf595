"""One exception type for every user-facing failure, so the CLI can print one line instead of a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class MMComposeError(Exception):
    """A problem with the user's input, configuration or files. Its message is one self-contained line."""


class InputError(MMComposeError):
    """A sample's input (file, array, placeholder) cannot be used; the message names the sample and the cause."""


class CheckpointError(MMComposeError):
    """A checkpoint directory is missing, malformed, or does not match what it claims."""


class CompositionError(MMComposeError):
    """The requested composition is invalid (different bases, duplicate modalities, bad parameters)."""


def preview(names: Iterable[str], count: int = 3) -> str:
    """The first `count` names, sorted, and how many more: long name lists stay on an error's one line."""
    names = sorted(names)
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more
