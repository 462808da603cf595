"""The server over real HTTP: answers equal the model API's, batching changes no answer, and every bad input
is a 4xx OpenAI-style error after which the server still answers a good request."""

from __future__ import annotations

import base64
import http.client
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mmcompose.checkpoint import load_checkpoint
from mmcompose.model import MultimodalLLM
from mmcompose.serve import Limits, ServerConfig
from tests.serve.conftest import LIMITS, Server, png_data_url, start_server, wav_base64

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> MultimodalLLM:
    """A second copy of the served model, folded the same way, for expected answers."""
    model = load_checkpoint(checkpoint).eval()
    model.fold_text_route()
    return model


def expected(reference: MultimodalLLM, human: str, inputs: dict[str, list[Any]] | None = None,
             tokens: int = MAX_TOKENS) -> str:
    example = reference.conversation_example([{"from": "human", "value": human}], inputs)
    return reference.generate([example], tokens)[0].strip()


def content_of(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def assert_alive(server: Server) -> None:
    status, reply = server.chat("hello, what lives in the desert?", max_tokens=4)
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


def stream(server: Server, body: dict) -> tuple[list[dict], list[str]]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    lines = [line for line in response.read().decode().split("\n") if line]
    connection.close()
    assert all(line.startswith("data: ") for line in lines)
    payloads = [line[len("data: "):] for line in lines]
    return [json.loads(p) for p in payloads if p != "[DONE]"], payloads


def test_models_and_health(server: Server) -> None:
    status, models = server.request("GET", "/v1/models")
    assert status == 200
    assert models["data"][0]["id"] == "tiny-model"
    assert models["data"][0]["modalities"] == ["image", "audio", "point"]
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok"


def test_answer_with_an_image_equals_the_model_api(server: Server, reference: MultimodalLLM) -> None:
    question = "what is this?"
    status, reply = server.chat([{"type": "text", "text": question},
                                 {"type": "image_url", "image_url": {"url": "photo.png"}}], max_tokens=MAX_TOKENS)
    assert status == 200, reply
    assert content_of(reply) == expected(reference, f"<image>\n{question}", {"image": [server.media / "photo.png"]})
    usage = reply["usage"]
    assert usage["completion_tokens"] >= 1 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
        "completion_tokens"]
    assert usage["prompt_tokens"] > 16  # the image's positions count


def test_multi_turn_audio_and_points(server: Server, reference: MultimodalLLM, tmp_path: Path) -> None:
    audio = tmp_path / "tone.wav"
    audio.write_bytes(base64.b64decode(wav_base64()))
    cloud = base64.b64encode((server.media / "cloud.npy").read_bytes()).decode()
    messages = [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "wav"}},
                                     {"type": "text", "text": "what makes this sound?"}]},
        {"role": "assistant", "content": "a bird"},
        {"role": "user", "content": [{"type": "text", "text": "and this shape?"},
                                     {"type": "point_cloud_url",
                                      "point_cloud_url": {"url": f"data:application/x-npy;base64,{cloud}"}}]},
    ]
    status, reply = server.request("POST", "/v1/chat/completions", {"messages": messages, "max_tokens": MAX_TOKENS})
    assert status == 200, reply
    turns = [{"from": "human", "value": "<audio>\nwhat makes this sound?"}, {"from": "gpt", "value": "a bird"},
             {"from": "human", "value": "<point>\nand this shape?"}]
    example = reference.conversation_example(turns, {"audio": [audio], "point": [server.media / "cloud.npy"]})
    assert content_of(reply) == reference.generate([example], MAX_TOKENS)[0].strip()


def test_streamed_chunks_add_up_to_the_answer(server: Server) -> None:
    body = {"messages": [{"role": "user", "content": "which habitat?"}], "max_tokens": MAX_TOKENS,
            "stream_options": {"include_usage": True}}
    chunks, payloads = stream(server, body)
    assert payloads[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    status, whole = server.request("POST", "/v1/chat/completions", body)
    assert status == 200
    assert text == content_of(whole)
    assert chunks[-1]["usage"] == whole["usage"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length" or text


def test_concurrent_requests_each_get_their_own_answer(server: Server, reference: MultimodalLLM) -> None:
    questions = [f"question {i}: what lives in the {place}?" for i, place in
                 enumerate(["desert", "forest", "sea", "cave", "desert and the sea", "forest floor"])]
    lengths = [MAX_TOKENS, 5, MAX_TOKENS, 3, 8, MAX_TOKENS]  # rows leave the batch at different steps
    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(lambda q_n: server.chat(q_n[0], max_tokens=q_n[1]), zip(questions, lengths,
                                                                                      strict=True)))
    for (status, reply), question, length in zip(replies, questions, lengths, strict=True):
        assert status == 200, reply
        assert content_of(reply) == expected(reference, question, tokens=length)


def test_sampling_with_a_seed_is_reproducible_and_stop_cuts(server: Server) -> None:
    options = {"max_tokens": MAX_TOKENS, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first = server.chat("tell me about quonks", **options)
    second = server.chat("tell me about quonks", **options)
    assert first[0] == second[0] == 200
    assert content_of(first[1]) == content_of(second[1])
    status, greedy = server.chat("tell me about quonks", max_tokens=MAX_TOKENS)
    greedy_text = content_of(greedy)
    if len(greedy_text) > 2:
        stop = greedy_text[len(greedy_text) // 2: len(greedy_text) // 2 + 2]
        status, cut = server.chat("tell me about quonks", max_tokens=MAX_TOKENS, stop=[stop])
        assert status == 200
        assert stop not in content_of(cut) and greedy_text.startswith(content_of(cut))
        assert cut["choices"][0]["finish_reason"] == "stop"


def test_a_vanishing_temperature_samples_the_greedy_answer(server: Server) -> None:
    """1e-45 is a valid temperature; dividing the logits by it gave inf, a NaN softmax and a 500."""
    status, greedy = server.chat("tell me about quonks", max_tokens=MAX_TOKENS)
    assert status == 200
    for temperature in (1e-45, 5e-324):
        status, reply = server.chat("tell me about quonks", max_tokens=MAX_TOKENS, temperature=temperature, seed=3)
        assert status == 200, (temperature, reply)
        assert content_of(reply) == content_of(greedy)


def test_the_extreme_seeds_sample(server: Server) -> None:
    for seed in (2**64 - 1, -(2**63)):
        status, reply = server.chat("tell me about quonks", max_tokens=4, temperature=1.0, seed=seed)
        assert status == 200, (seed, reply)


def _image(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]


def _messages(content: Any) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4}


PNG = png_data_url()
BAD_REQUESTS: dict[str, tuple[Any, int, str]] = {
    "malformed JSON": ('{"messages": [', 400, "not valid JSON"),
    "not UTF-8": (b"\xff\xfe{", 400, "not valid JSON"),
    "JSON not an object": ("[1, 2]", 400, "invalid request"),
    "messages of wrong type": ({"messages": "hello"}, 400, "messages"),
    "no messages": ({"messages": []}, 400, "messages"),
    "max_tokens of wrong type": ({**_messages("hi"), "max_tokens": "ten"}, 400, "max_tokens"),
    "max_tokens above the limit": ({**_messages("hi"), "max_tokens": 10_000}, 400, "limit"),
    # json.loads raised RecursionError here (a 500); pydantic's parser stops at 200 levels
    "JSON nested 100000 deep": ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "recursion limit"),
    "JSON nested 150 deep": ('{"messages": ' + "[" * 150 + "]" * 150 + "}", 400, "messages"),
    "integer of 5000 digits": ('{"messages": [], "seed": ' + "9" * 5000 + "}", 400, "not valid JSON"),
    "seed beyond 64 bits": ({**_messages("hi"), "temperature": 1.0, "seed": 2**64}, 400, "seed"),
    "seed below int64": ({**_messages("hi"), "temperature": 1.0, "seed": -(2**63) - 1}, 400, "seed"),
    "temperature out of range": ({**_messages("hi"), "temperature": 9}, 400, "temperature"),
    "n of 2": ({**_messages("hi"), "n": 2}, 400, "n=2"),
    "unknown part type": (_messages([{"type": "hologram", "hologram": {}}]), 400, "type"),
    "conversation ending with the assistant": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "end with"),
    "placeholder typed as text": (_messages("look: <image>"), 400, "placeholder"),
    "bad base64": (_messages(_image("data:image/png;base64,!!not-base64!!")), 400, "base64"),
    "data URL not base64": (_messages(_image("data:image/png,rawbytes")), 400, "base64"),
    "corrupt image": (_messages(_image("data:image/png;base64," + base64.b64encode(os.urandom(300)).decode())),
                      400, "image"),
    "truncated PNG": (_messages(_image(PNG[:22] + PNG[22:][: len(PNG) // 8 * 4])), 400, "image"),
    "remote URL": (_messages(_image("https://example.com/cat.png")), 400, "remote URLs"),
    "path with ..": (_messages(_image("../photo.png")), 403, "outside"),
    "absolute path elsewhere": (_messages(_image("/etc/hostname")), 403, "outside"),
    "file: URL elsewhere": (_messages(_image("file:///etc/hostname")), 403, "outside"),
    "symlink out of the media dir": (_messages(_image("escape.png")), 403, "outside"),
    "missing file": (_messages(_image("nothing-here.png")), 400, "no such file"),
    "NUL byte in a path": (_messages(_image("photo\x00.png")), 400, "cannot resolve"),
    "NUL byte in a file: URL": (_messages(_image("file:///tmp/%00x")), 400, "cannot resolve"),
    "name too long for the file system": (_messages(_image("a" * 5000)), 400, "no such file"),
    "modality the model lacks": (
        _messages([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]), 400, "video"),
    "too many media": (_messages([{"type": "image_url", "image_url": {"url": PNG}}] * 4), 400, "limit"),
    "media too large": (_messages(_image("data:image/png;base64," + "A" * 400_000)), 413, "limit"),
    "body too large": (_messages("x" * (3 * 1024 * 1024)), 413, "limit"),
    "audio format not allowed": (
        _messages([{"type": "input_audio", "input_audio": {"data": wav_base64(), "format": "ogg"}}]), 400, "format"),
    "corrupt audio": (
        _messages([{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF" + os.urandom(200))
                                                           .decode(), "format": "wav"}}]), 400, "audio"),
    "corrupt point cloud": (
        _messages([{"type": "point_cloud_url", "point_cloud_url": {
            "url": "data:application/x-npy;base64," + base64.b64encode(b"\x93NUMPY garbage").decode()}}]),
        400, "npy"),
    "prompt longer than the model's context": (_messages("the zeppa lives in the desert " * 200), 400,
                                                "exceeds the model's limit"),
    "media in an assistant message": (
        {"messages": [{"role": "assistant", "content": _image(PNG)}, {"role": "user", "content": "hi"}]}, 400,
        "user messages"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_error_object_and_the_server_lives(server: Server, name: str) -> None:
    escape = server.media / "escape.png"
    if not escape.is_symlink():
        escape.symlink_to(server.media.parent / "outside.png")
        (server.media.parent / "outside.png").write_bytes(base64.b64decode(PNG.split(",")[1]))
    body, status, fragment = BAD_REQUESTS[name]
    got, reply = server.request("POST", "/v1/chat/completions", body)
    assert got == status, reply
    assert set(reply) == {"error"} and set(reply["error"]) == {"message", "type", "param", "code"}
    assert fragment.lower() in reply["error"]["message"].lower(), reply
    assert_alive(server)


def test_unknown_route_and_method_are_error_objects(server: Server) -> None:
    status, reply = server.request("GET", "/v1/nothing")
    assert status == 404 and "error" in reply
    status, reply = server.request("GET", "/v1/chat/completions")
    assert status == 405 and "error" in reply
    assert_alive(server)


def test_api_key_is_required_when_set(checkpoint: Path, media_dir: Path) -> None:
    model = load_checkpoint(checkpoint)
    running, thread, port = start_server(model, ServerConfig(model_id="keyed", api_key="s3cret", limits=LIMITS))
    try:
        keyed = Server("127.0.0.1", port, model, media_dir, api_key="s3cret")
        anonymous = Server("127.0.0.1", port, model, media_dir)
        wrong = Server("127.0.0.1", port, model, media_dir, api_key="guess")
        for client in (anonymous, wrong):
            status, reply = client.chat("hi", max_tokens=2)
            assert status == 401 and reply["error"]["type"] == "authentication_error"
            assert client.request("GET", "/v1/models")[0] == 401
        assert keyed.request("GET", "/v1/models")[0] == 200
        assert_alive(keyed)
    finally:
        running.should_exit = True
        thread.join(timeout=10)


def test_a_client_leaving_mid_stream_frees_its_slot(checkpoint: Path, media_dir: Path,
                                                    reference: MultimodalLLM) -> None:
    long = 600
    prompt = next((p for p in ("tell me a long story", "describe the desert", "list every animal", "count")
                   if _runs_to_the_end(reference, p, long)), None)
    assert prompt is not None, "no prompt found that decodes without EOS; the test could not tell a freed slot"
    model = load_checkpoint(checkpoint)
    limits = Limits(max_tokens=long, request_seconds=60.0)
    running, thread, port = start_server(model, ServerConfig(model_id="one-slot", max_batch=1, limits=limits))
    client = Server("127.0.0.1", port, model, media_dir)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": long, "stream": True}
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200
        response.fp.readline()  # the first chunk: the row is in the batch now
        assert client.request("GET", "/health")[1]["active"] == 1
        connection.sock.close()
        connection.close()
        deadline = time.monotonic() + 10
        while client.request("GET", "/health")[1]["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        status, health = client.request("GET", "/health")
        assert status == 200 and health["active"] == 0
        assert health["cancelled_rows"] == 1  # it left because its client went away, not because it finished
        assert_alive(client)
    finally:
        running.should_exit = True
        thread.join(timeout=10)


def _runs_to_the_end(reference: MultimodalLLM, prompt: str, tokens: int) -> bool:
    example = reference.conversation_example([{"from": "human", "value": prompt}])
    count: list[int] = []
    reference.generate([example], tokens, on_token=lambda row, token: count.append(token))
    return len(count) == tokens and reference.tokenizer.eos_token_id not in count


def test_a_request_over_the_time_limit_is_a_408_and_leaves_no_row(checkpoint: Path, media_dir: Path) -> None:
    model = load_checkpoint(checkpoint)
    limits = Limits(max_tokens=64, request_seconds=0.001)
    running, thread, port = start_server(model, ServerConfig(model_id="hasty", limits=limits))
    client = Server("127.0.0.1", port, model, media_dir)
    try:
        status, reply = client.chat("hello", max_tokens=64)
        assert status == 408 and "longer than" in reply["error"]["message"]
        deadline = time.monotonic() + 10
        while client.request("GET", "/health")[1]["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        status, health = client.request("GET", "/health")
        assert status == 200 and health["active"] == 0
    finally:
        running.should_exit = True
        thread.join(timeout=10)


def test_a_failing_forward_is_a_500_error_object_and_the_next_request_works(server: Server, monkeypatch) -> None:
    import mmcompose.serve.batcher as batcher_module

    real_step, calls = batcher_module.step, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(batcher_module, "step", failing_once)
    status, reply = server.chat("hello there", max_tokens=6)
    assert status == 500 and reply["error"]["type"] == "server_error"
    assert "simulated failure" in reply["error"]["message"]
    assert_alive(server)


def test_a_full_queue_is_a_429(checkpoint: Path, media_dir: Path) -> None:
    model = load_checkpoint(checkpoint)
    running, thread, port = start_server(model, ServerConfig(model_id="full", limits=Limits(max_waiting=0)))
    client = Server("127.0.0.1", port, model, media_dir)
    try:
        status, reply = client.chat("hello", max_tokens=4)
        assert status == 429 and reply["error"]["type"] == "rate_limit_error"
        assert client.request("GET", "/health")[0] == 200
    finally:
        running.should_exit = True
        thread.join(timeout=10)
