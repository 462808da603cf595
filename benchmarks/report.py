"""Shared by the benchmark scripts: print a result section and append it to benchmarks/RESULTS.md."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], results: Path) -> None:
    """Print the section and append it, separated by a blank line from what the file already holds."""
    text = "\n".join(lines) + "\n"
    print(text)
    separator = "\n" if results.is_file() and results.stat().st_size else ""
    with results.open("a") as handle:
        handle.write(separator + text)
