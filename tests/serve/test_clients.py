"""The official `openai` Python client against the server: the same answers, whole and streamed."""

from __future__ import annotations

import pytest

from tests.serve.conftest import Server, png_data_url

openai = pytest.importorskip("openai", reason="the openai client is in the test extra (pip install openai)")


def test_openai_client_whole_and_streamed(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [model.id for model in client.models.list()] == ["tiny-model"]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(3)}},
                                             {"type": "text", "text": "what is it?"}]}]
    whole = client.chat.completions.create(model="tiny-model", messages=messages, max_tokens=10)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens >= 1
    chunks = list(client.chat.completions.create(model="tiny-model", messages=messages, max_tokens=10, stream=True))
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_openai_client_raises_on_a_bad_request(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError, match="video"):
        client.chat.completions.create(model="tiny-model", max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}])
