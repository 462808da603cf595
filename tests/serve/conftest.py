"""A tiny image+audio+point checkpoint served by uvicorn on 127.0.0.1 (an ephemeral port) in a thread."""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from mmcompose.checkpoint import load_checkpoint, save_checkpoint
from mmcompose.model import MultimodalLLM, modality_spec
from mmcompose.serve import Limits, ServerConfig, create_app
from mmcompose.serve.media import MediaLimits
from tests.model.helpers import randomize_deltas

LIMITS = Limits(max_body_bytes=2 * 1024 * 1024, max_tokens=64, request_seconds=60.0,
                media=MediaLimits(max_media=3, max_media_bytes=256 * 1024))


@pytest.fixture(scope="session")
def checkpoint(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = MultimodalLLM.from_base(llama_base, [modality_spec("image"), modality_spec("audio"),
                                                 modality_spec("point")], strategy="decoupled")
    randomize_deltas(model, scale=0.5)
    return save_checkpoint(model, tmp_path_factory.mktemp("serve") / "tiny-model")


@dataclass
class Server:
    """A running server and what the tests need to talk to it."""

    host: str
    port: int
    model: MultimodalLLM
    media: Path
    api_key: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, Any]:
        """One HTTP exchange; the JSON reply decoded (or the raw text when it is not JSON)."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        data = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) \
            else body
        sent = {"Content-Type": "application/json"}
        if self.api_key:
            sent["Authorization"] = f"Bearer {self.api_key}"
        sent.update(headers or {})
        try:
            connection.request(method, path, body=data, headers=sent)
            response = connection.getresponse()
            raw = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def chat(self, content: Any, **options: Any) -> tuple[int, Any]:
        return self.request("POST", "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": content}], **options})


def start_server(model: MultimodalLLM, config: ServerConfig) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model, config), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    return server, thread, port


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("media")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        directory / "photo.png")
    np.save(directory / "cloud.npy", np.random.default_rng(1).normal(size=(600, 3)).astype(np.float32))
    return directory


@pytest.fixture(scope="session")
def server(checkpoint: Path, media_dir: Path) -> Iterator[Server]:
    model = load_checkpoint(checkpoint)
    config = ServerConfig(model_id="tiny-model", max_batch=4, allowed_media_dir=media_dir, limits=LIMITS)
    running, thread, port = start_server(model, config)
    yield Server("127.0.0.1", port, model, media_dir)
    running.should_exit = True
    thread.join(timeout=10)


def png_data_url(seed: int = 0, size: int = 32) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_base64(seconds: float = 0.5, rate: int = 16000) -> str:
    import soundfile

    wave = np.sin(np.linspace(0, 440 * 2 * np.pi * seconds, int(rate * seconds))).astype(np.float32) * 0.3
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format="WAV")
    return base64.b64encode(buffer.getvalue()).decode()
