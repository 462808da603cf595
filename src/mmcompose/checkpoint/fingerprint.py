"""A fingerprint of a base LLM's weights, read from its safetensors files without loading them.

Hashing every byte of a 7B model costs a minute; composition only needs to tell different bases apart,
and two different bases (or a base and a fine-tune) differ almost everywhere. So the fingerprint hashes
each tensor's name, dtype and shape plus 64 evenly spaced 64-byte windows of its data. It detects a
different base, not a single flipped bit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mmcompose.tensorfiles import safetensors_header, weight_files

WINDOWS, WINDOW_BYTES = 64, 64


def fingerprint_base(directory: str | Path) -> str:
    """`sha256:<hex>` over every tensor of the base LLM's safetensors files, in name order."""
    entries: dict[str, tuple[Path, int, dict]] = {}
    for file in weight_files(Path(directory)):
        header, data_start = safetensors_header(file)
        for name, info in header.items():
            entries[name] = (file, data_start, info)
    digest = hashlib.sha256()
    handles: dict[Path, object] = {}
    try:
        for name in sorted(entries):
            file, data_start, info = entries[name]
            handle = handles.setdefault(file, open(file, "rb"))  # noqa: SIM115 - closed in finally
            begin, end = info["data_offsets"]
            digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            span = end - begin
            step = max(span // WINDOWS, 1)
            for offset in range(0, span, step)[:WINDOWS]:
                handle.seek(data_start + begin + offset)
                digest.update(handle.read(min(WINDOW_BYTES, span - offset)))
    finally:
        for handle in handles.values():
            handle.close()
    return "sha256:" + digest.hexdigest()
