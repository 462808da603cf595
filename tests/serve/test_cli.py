"""`mmcompose serve`: the real command serves a checkpoint; bad arguments are one-line errors."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmcompose.cli import app


def test_serve_command_answers_on_its_port(checkpoint: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mmcompose.cli", "serve", str(checkpoint), "--port", str(port),
                               "--api-key", "k", "--allowed-origins", "http://localhost:3000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/v1/models", headers={"Authorization": "Bearer k"})
                response = connection.getresponse()
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert response.status == 200
        assert json.loads(response.read())["data"][0]["id"] == checkpoint.name
        for headers, status in (({"Origin": "http://localhost:3000"}, 200),
                                ({"Origin": "http://evil.example.com"}, 403), ({"Host": "evil.example.com"}, 403)):
            connection.request("GET", "/v1/models", headers={"Authorization": "Bearer k", **headers})
            response = connection.getresponse()
            response.read()
            assert response.status == status, headers
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_refuses_a_missing_checkpoint_and_media_dir(tmp_path: Path, checkpoint: Path) -> None:
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "error" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["serve", str(checkpoint), "--allowed-media-dir", str(tmp_path / "none")])
    assert result.exit_code == 2 and "not a directory" in result.output


def test_serve_refuses_an_allowed_origin_that_is_no_origin(checkpoint: Path, monkeypatch) -> None:
    import mmcompose.checkpoint

    monkeypatch.setattr(mmcompose.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("model loaded"))
    result = CliRunner().invoke(app, ["serve", str(checkpoint), "--allowed-origins", "localhost:3000"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --allowed-origins 'localhost:3000': not an origin; give "
                                     "scheme://host[:port] (e.g. http://localhost:3000) or *")
