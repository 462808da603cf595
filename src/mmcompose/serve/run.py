"""Load a checkpoint and run the app under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmcompose.errors import MMComposeError
from mmcompose.serve.app import Limits, ServerConfig, create_app
from mmcompose.serve.guard import parse_origins
from mmcompose.serve.media import MediaLimits


def serve(checkpoint: Path, *, host: str, port: int, api_key: str | None, max_batch: int,
          allowed_media_dir: Path | None, max_tokens: int, request_seconds: float, max_media: int,
          max_media_mb: float, base: Path | None = None, allowed_origins: list[str] | None = None,
          placement: dict[str, Any] | None = None) -> None:
    """`placement`: `load_checkpoint`'s device, dtype, device_map, max_memory and offload_folder."""
    import uvicorn

    from mmcompose.checkpoint import load_checkpoint

    if allowed_media_dir is not None and not allowed_media_dir.is_dir():
        raise MMComposeError(f"--allowed-media-dir {allowed_media_dir}: not a directory")
    origins = parse_origins(allowed_origins or [])
    model = load_checkpoint(checkpoint, base=base, **(placement or {}))
    limits = Limits(max_tokens=max_tokens, request_seconds=request_seconds,
                    media=MediaLimits(max_media=max_media, max_media_bytes=int(max_media_mb * 1024 * 1024)))
    config = ServerConfig(model_id=checkpoint.resolve().name, api_key=api_key, max_batch=max_batch,
                          allowed_media_dir=allowed_media_dir, limits=limits, host=host, allowed_origins=origins)
    uvicorn.run(create_app(model, config), host=host, port=port, log_level="info")
