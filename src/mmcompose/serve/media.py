"""Content parts -> the model's inputs: data: URLs and files inside the allowed media directory only.

Media bytes are written to a private temporary file with a suffix that names their format, and then go
through the model's own processors (`mmcompose.io` loaders and their guards: decompression bombs, durations,
corrupt or truncated files), exactly as `mmcompose chat` reads files. Remote URLs are never fetched.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import torch

from mmcompose.errors import MMComposeError
from mmcompose.model.assembly import Example
from mmcompose.model.mllm import MultimodalLLM
from mmcompose.serve.schema import PART_MODALITY, ChatRequest, ServeError, TextPart

#: File suffix for a data: URL's media type, per modality; images and videos are also recognised by their
#: content, so another media type still decodes when the bytes are a supported format.
MEDIA_SUFFIXES = {
    "image": {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif",
              "image/bmp": ".bmp"},
    "video": {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-msvideo": ".avi",
              "video/x-matroska": ".mkv"},
    "point": {"application/x-npy": ".npy", "application/octet-stream": ".npy", "model/ply": ".ply",
              "application/ply": ".ply", "model/off": ".off", "application/off": ".off", "text/plain": ".off"},
}
DEFAULT_SUFFIX = {"image": ".img", "video": ".video"}
#: Placeholders go at the start of the user turn, one line per input, as the training data has them.
PLACEHOLDER_ORDER = ("image", "audio", "video", "point")


@dataclass(frozen=True)
class MediaLimits:
    max_media: int = 8
    max_media_bytes: int = 20 * 1024 * 1024


class MediaReader:
    """Resolves media parts into files (data: URLs decoded into `scratch`, paths checked against `allowed`)."""

    def __init__(self, scratch: Path, allowed: Path | None, limits: MediaLimits) -> None:
        self.scratch, self.allowed, self.limits = scratch, allowed.resolve() if allowed else None, limits
        self.count = 0

    def data(self, modality: str, payload: str, suffix: str, where: str) -> Path:
        if len(payload) * 3 // 4 > self.limits.max_media_bytes:
            raise ServeError(413, f"{where}: media larger than the limit of {self.limits.max_media_bytes} bytes",
                             param=where)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ServeError(400, f"{where}: invalid base64 data", param=where) from None
        if not raw:
            raise ServeError(400, f"{where}: empty media data", param=where)
        self.count += 1
        path = self.scratch / f"{modality}-{self.count}{suffix}"
        path.write_bytes(raw)
        return path

    def url(self, modality: str, url: str, where: str) -> Path:
        if url.startswith("data:"):
            header, comma, payload = url[5:].partition(",")
            if not comma or not header.endswith(";base64"):
                raise ServeError(400, f"{where}: data: URL must be base64 (data:<type>;base64,<data>)", param=where)
            media_type = header[: -len(";base64")].split(";")[0].strip().lower()
            suffixes = MEDIA_SUFFIXES.get(modality, {})
            suffix = suffixes.get(media_type, DEFAULT_SUFFIX.get(modality))
            if suffix is None:
                raise ServeError(400, f"{where}: media type {media_type or '(none)'!r} is not a {modality} format "
                                 f"(use one of: {', '.join(sorted(suffixes))})", param=where)
            return self.data(modality, payload, suffix, where)
        scheme = urlsplit(url).scheme.lower()
        if scheme == "file":
            path_text = unquote(urlsplit(url).path)
        elif len(scheme) > 1:  # one letter is a Windows drive, not a scheme
            raise ServeError(400, f"{where}: remote URLs ({scheme}:) are not fetched; send the media inline as a "
                             "data: URL, or as a path inside the server's --allowed-media-dir", param=where)
        else:
            path_text = url
        return self.path(path_text, where)

    def path(self, text: str, where: str) -> Path:
        if self.allowed is None:
            raise ServeError(400, f"{where}: file paths are disabled; start the server with --allowed-media-dir, "
                             "or send the media inline as a data: URL", param=where)
        candidate = Path(text)
        candidate = candidate if candidate.is_absolute() else self.allowed / candidate
        # a NUL byte is a ValueError and a name too long for the file system an OSError, from any of these calls
        try:
            resolved = candidate.resolve()  # follows every symlink, so a link cannot lead outside
        except (OSError, RuntimeError, ValueError):
            raise ServeError(400, f"{where}: cannot resolve path {text!r}", param=where) from None
        if not resolved.is_relative_to(self.allowed):
            raise ServeError(403, f"{where}: path {text!r} is outside the allowed media directory", param=where,
                             kind="permission_error")
        try:
            size = resolved.stat().st_size if resolved.is_file() else None
        except (OSError, ValueError):
            size = None
        if size is None:
            raise ServeError(400, f"{where}: no such file {text!r} in the allowed media directory", param=where)
        if size > self.limits.max_media_bytes:
            raise ServeError(413, f"{where}: file larger than the limit of {self.limits.max_media_bytes} bytes",
                             param=where)
        return resolved


def build_example(model: MultimodalLLM, request: ChatRequest, allowed: Path | None, limits: MediaLimits) -> Example:
    """Messages -> one `Example`: the conversation rendered with the model's template, each user turn's media
    as placeholder lines before its text, every input processed now (so bad media is a 400 before queueing)."""
    placeholders = {m.name: m.placeholder for m in model.spec.modalities}
    system: list[str] = []
    turns: list[dict[str, str]] = []
    sources: dict[str, list[Path]] = {}
    total = sum(1 for message in request.messages if isinstance(message.content, list)
                for part in message.content if part.type in PART_MODALITY)
    if total > limits.max_media:
        raise ServeError(400, f"{total} media parts in one request; the limit is {limits.max_media}")
    with tempfile.TemporaryDirectory(prefix="mmcompose-serve-") as scratch:
        reader = MediaReader(Path(scratch), allowed, limits)
        for index, message in enumerate(request.messages):
            parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) \
                else list(message.content or [])
            texts, media = [], []
            for number, part in enumerate(parts):
                where = f"messages.{index}.content.{number}"
                if isinstance(part, TextPart):
                    for name, placeholder in placeholders.items():
                        if placeholder in part.text:
                            raise ServeError(400, f"{where}: text contains the {name} placeholder {placeholder}; "
                                             "attach media as content parts instead", param=where)
                    texts.append(part.text)
                    continue
                modality = PART_MODALITY[part.type]
                if message.role != "user":
                    raise ServeError(400, f"{where}: {part.type} in a message of role {message.role}; media go in user "
                                     "messages", param=where)
                if modality not in placeholders:
                    raise ServeError(400, f"{where}: {part.type} needs the {modality} modality, which this model "
                                     f"does not have (it has: {', '.join(placeholders) or 'text only'})", param=where)
                if part.type == "input_audio":
                    path = reader.data(modality, part.input_audio.data, f".{part.input_audio.format}", where)
                else:
                    path = reader.url(modality, getattr(part, part.type).url, where)
                media.append(modality)
                sources.setdefault(modality, []).append(path)
            text = "\n".join(texts)
            if message.role in ("system", "developer"):
                system.append(text)
            elif message.role == "assistant":
                turns.append({"from": "gpt", "value": text})
            else:
                order = sorted(media, key=lambda m: PLACEHOLDER_ORDER.index(m) if m in PLACEHOLDER_ORDER else 99)
                lines = [placeholders[m] for m in order]
                if system and not any(turn["from"] == "human" for turn in turns):
                    text = "\n".join([*system, text])
                turns.append({"from": "human", "value": "\n".join([*lines, text]) if text else "\n".join(lines)})
        if not turns or turns[-1]["from"] != "human":
            raise ServeError(400, "messages: the conversation must end with a user message", param="messages")
        prompt, _ = model.format_conversation(turns)
        try:
            with torch.no_grad():
                return model.example(prompt, sources, id="request")
        except MMComposeError as error:
            raise ServeError(400, _without_scratch(str(error), scratch)) from None
        except Exception as error:  # a decoder failing in a way its guards did not foresee is still bad input
            raise ServeError(400, f"cannot decode media: {type(error).__name__}: {error}") from None


def _without_scratch(message: str, scratch: str) -> str:
    """Processor messages name the temporary file; name the content part's modality file instead."""
    return " ".join(message.replace(scratch + "/", "").split())
