"""The subset of the OpenAI chat-completions request schema the server accepts, and its error object.

Differences from OpenAI's API, on purpose: `temperature` defaults to 0 (greedy, as `mmcompose chat`), only
`n = 1`, and two content parts OpenAI does not have: `video_url` and `point_cloud_url` (`{url}` like
`image_url`). Unknown top-level fields are ignored, as OpenAI-compatible servers commonly do; unknown content
part types are refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ServeError(Exception):
    """A request the server refuses: HTTP status plus an OpenAI-style error object."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MediaURL(_Strict):
    url: str
    detail: str | None = None  # OpenAI's image detail hint; the processor decides the resolution


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "flac", "mp3"]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: MediaURL


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: MediaURL


class PointCloudPart(_Strict):
    type: Literal["point_cloud_url"]
    point_cloud_url: MediaURL


Part = Annotated[TextPart | ImagePart | AudioPart | VideoPart | PointCloudPart, Field(discriminator="type")]

#: Which modality each media part feeds.
PART_MODALITY = {"image_url": "image", "input_audio": "audio", "video_url": "video", "point_cloud_url": "point"}


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


#: The seeds `torch.Generator.manual_seed` takes (beyond them it raises `ValueError`): int64 or uint64.
SEED_RANGE = (-(2**63), 2**64 - 1)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


def parse_request(data: Any) -> ChatRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as error:
        # the deepest error names the field; shallower ones are the other branches of a union (string content)
        first = max(error.errors(), key=lambda item: len(item["loc"]))
        where = ".".join(str(part) for part in first["loc"] if str(part) != "str" and "[" not in str(part))
        raise ServeError(400, f"invalid request: {where or 'body'}: {first['msg']}", param=where or None) from None
    if request.n != 1:
        raise ServeError(400, f"n={request.n} is not supported; only n=1", param="n")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(not stop for stop in stops):
        raise ServeError(400, "stop: up to 4 non-empty strings", param="stop")
    return request


def stop_strings(request: ChatRequest) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
