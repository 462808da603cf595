"""What a web page can make the user's browser send to a loopback server is refused before the model runs:
a cross-origin Origin (403), a body that is not JSON (415), a foreign Host header (403, DNS rebinding). The
server's own page, origins named in --allowed-origins, and non-browser clients keep working."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mmcompose.checkpoint import load_checkpoint
from mmcompose.errors import MMComposeError
from mmcompose.serve import ServerConfig
from mmcompose.serve.guard import is_loopback, parse_origins
from tests.serve.conftest import LIMITS, Server, start_server

EVIL = "http://evil.example.com"
CHAT = {"messages": [{"role": "user", "content": "what lives in the desert?"}], "max_tokens": 3}
FRIEND = "http://localhost:3000"


@pytest.fixture
def model_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the serving steps that ran: decoding the request's media, and the model's prefill."""
    import mmcompose.serve.app as app_module
    import mmcompose.serve.batcher as batcher_module

    ran: list[str] = []
    real_build, real_prefill = app_module.build_example, batcher_module.prefill

    def build(*args, **kwargs):
        ran.append("build_example")
        return real_build(*args, **kwargs)

    def prefill(*args, **kwargs):
        ran.append("prefill")
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(app_module, "build_example", build)
    monkeypatch.setattr(batcher_module, "prefill", prefill)
    return ran


def _post(server: Server, headers: dict[str, str], body: str | dict = CHAT) -> tuple[int, dict]:
    return server.request("POST", "/v1/chat/completions", body, headers=headers)


def _assert_error(reply: dict, fragment: str) -> None:
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert fragment in reply["error"]["message"], reply


def test_a_text_plain_post_from_a_foreign_page_never_reaches_the_model(server: Server, model_runs: list[str]) -> None:
    """What any page can send without a preflight: `fetch(url, {method: "POST", body: JSON.stringify(...)})`."""
    import json

    status, reply = _post(server, {"Content-Type": "text/plain;charset=UTF-8", "Origin": EVIL}, json.dumps(CHAT))
    assert status == 403
    _assert_error(reply, EVIL)
    assert "--allowed-origins" in reply["error"]["message"]
    assert model_runs == []


def test_a_foreign_origin_is_refused_whatever_it_sends(server: Server, model_runs: list[str]) -> None:
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/")):
        status, reply = server.request(method, path, CHAT if method == "POST" else None, headers={"Origin": EVIL})
        assert status == 403, (method, path, reply)
        _assert_error(reply, "cross-origin")
    status, reply = server.request("GET", "/", headers={"Origin": "null"})  # a sandboxed frame or a file: page
    assert status == 403
    preflight = {"Origin": EVIL, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    status, reply = server.request("OPTIONS", "/v1/chat/completions", headers=preflight)
    assert status == 403
    assert model_runs == []


def test_a_body_that_is_not_json_is_a_415(server: Server, model_runs: list[str]) -> None:
    import json

    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        status, reply = _post(server, {"Content-Type": content_type}, json.dumps(CHAT))
        assert status == 415, (content_type, reply)
        _assert_error(reply, "application/json")
    status, reply = server.request("POST", "/v1/chat/completions", json.dumps(CHAT), headers={"Content-Type": ""})
    assert status == 415
    assert model_runs == []
    status, reply = _post(server, {"Content-Type": "application/json; charset=utf-8"})
    assert status == 200, reply
    assert model_runs == ["build_example", "prefill"]


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:{port}", "127.0.0.1.evil.example.com",
                                  "10.0.0.5:{port}", "localhost.evil.example.com:{port}", "[::1"])
def test_a_foreign_host_header_is_refused(server: Server, model_runs: list[str], host: str) -> None:
    """DNS rebinding: the page's own name re-resolved to 127.0.0.1, its requests carry `Host: evil...`."""
    host = host.format(port=server.port)
    for method, path in (("GET", "/"), ("GET", "/health"), ("POST", "/v1/chat/completions")):
        status, reply = server.request(method, path, CHAT if method == "POST" else None, headers={"Host": host})
        assert status == 403, (host, path, reply)
        _assert_error(reply, "Host")
    # the rebinding page is same-origin with itself; that does not help it
    status, _ = _post(server, {"Host": f"evil.example.com:{server.port}", "Origin": f"{EVIL}:{server.port}"})
    assert status == 403
    assert model_runs == []


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST",
                                  "127.0.0.1:9999", "app.localhost:{port}"])
def test_loopback_host_headers_are_served(server: Server, host: str) -> None:
    """Any port: a tunnel (`ssh -L 9999:localhost:8000`) reaches the server under another one."""
    status, health = server.request("GET", "/health", headers={"Host": host.format(port=server.port)})
    assert status == 200 and health["status"] == "ok"


def test_the_served_page_is_same_origin(server: Server) -> None:
    """What the page's own `fetch` sends: Origin = the address the browser loaded it from."""
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
        status, reply = _post(server, {"Host": host, "Origin": f"http://{host}"})
        assert status == 200, (host, reply)
    status, _ = _post(server, {"Origin": f"http://127.0.0.1:{server.port + 1}"})  # another port is another origin
    assert status == 403


@pytest.fixture(scope="module")
def open_server(checkpoint: Path, media_dir: Path) -> Iterator[Server]:
    """A server allowing one more origin, configured as if bound to every interface (no Host check)."""
    model = load_checkpoint(checkpoint)
    config = ServerConfig(model_id="tiny-model", limits=LIMITS, host="0.0.0.0",
                          allowed_origins=parse_origins([f"{FRIEND}/"]))
    running, thread, port = start_server(model, config)
    yield Server("127.0.0.1", port, model, media_dir)
    running.should_exit = True
    thread.join(timeout=10)


def test_an_allowed_origin_calls_the_api_with_cors(open_server: Server) -> None:
    import http.client
    import json

    preflight = {"Origin": FRIEND, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    connection = http.client.HTTPConnection(open_server.host, open_server.port, timeout=60)
    connection.request("OPTIONS", "/v1/chat/completions", headers=preflight)
    response = connection.getresponse()
    response.read()
    assert response.status == 200
    assert response.getheader("access-control-allow-origin") == FRIEND
    assert "POST" in response.getheader("access-control-allow-methods")
    assert {"authorization", "content-type", "x-stainless-os"} <= {
        name.strip() for name in response.getheader("access-control-allow-headers").lower().split(",")}
    connection.request("POST", "/v1/chat/completions", body=json.dumps(CHAT),
                       headers={"Origin": FRIEND, "Content-Type": "application/json"})
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    assert response.status == 200, reply
    assert response.getheader("access-control-allow-origin") == FRIEND
    assert reply["choices"][0]["message"]["content"] is not None
    status, reply = _post(open_server, {"Origin": EVIL})
    assert status == 403
    _assert_error(reply, "cross-origin")


def test_a_server_bound_beyond_loopback_takes_any_host_but_not_any_origin(open_server: Server) -> None:
    assert open_server.request("GET", "/health", headers={"Host": "gpu-box.lan:8000"})[0] == 200
    assert _post(open_server, {"Host": "gpu-box.lan:8000", "Origin": "http://gpu-box.lan:8000"})[0] == 200
    assert _post(open_server, {"Host": "gpu-box.lan:8000", "Origin": EVIL})[0] == 403


def test_parse_origins() -> None:
    assert parse_origins(["HTTP://LocalHost:3000/", "https://app.example.com,http://127.0.0.1:5173"]) == {
        "http://localhost:3000", "https://app.example.com", "http://127.0.0.1:5173"}
    assert parse_origins(["*"]) == {"*"}
    for bad in ("localhost:3000", "http://localhost:3000/path", "ftp://host", "http://", "http://a:99999",
                "http://user@host", "http://[::1"):
        with pytest.raises(MMComposeError, match="--allowed-origins"):
            parse_origins([bad])


def test_is_loopback() -> None:
    assert all(is_loopback(name) for name in ("localhost", "127.0.0.1", "127.8.9.10", "::1", "a.localhost",
                                              "localhost."))
    assert not any(is_loopback(name) for name in ("0.0.0.0", "10.0.0.1", "::", "evil.example.com",
                                                  "localhost.evil.example.com", "", None))
