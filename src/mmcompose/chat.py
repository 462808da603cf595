"""`mmcompose chat`: ask a model about files, once or in a multi-turn session, with answers streamed.

A session keeps the model's KV cache across turns. Each attached file is decoded and encoded once, when
attached; its LLM positions (connector output with boundary tokens) are kept for the session. A turn renders
the whole conversation in the model's template, as the model was trained to read it, lays it out in
positions, and prefills only the positions after the longest prefix the cache already holds: the new turn, plus
the end of the last answer where its generated tokens differ from the tokenization of its text (the template
re-renders the stored answer). So every answer is the one a fresh prefill of the whole conversation gives, at
the cost of the new tokens only.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import DynamicCache

from mmcompose.errors import InputError, MMComposeError
from mmcompose.modalities import MODALITIES
from mmcompose.model.assembly import Example
from mmcompose.model.generation import DecodeState, decode, feed
from mmcompose.model.mllm import MultimodalLLM
from mmcompose.model.routed import TEXT_ROUTE

PROMPT = "> "


def commands_help(model: MultimodalLLM) -> str:
    """The interactive commands: one `/MODALITY PATH` per modality of the model, then the session's own."""
    attach = [f"/{name} PATH" for name in model.processors]
    verb = "attaches" if len(attach) == 1 else "attach"
    first = f"{', '.join(attach)} {verb} a file to your next message; " if attach else ""
    return f"commands: {first}/reset starts over; /quit (or Ctrl-D) exits"


def parse_inputs(items: Iterable[str]) -> list[tuple[str, Path]]:
    """`--input MODALITY=PATH` values, in the order given; the model checks the modality when attaching."""
    pairs = []
    for item in items:
        modality, separator, path = item.partition("=")
        if not separator or not modality.strip() or not path:
            raise MMComposeError(f"--input expects MODALITY=PATH (e.g. image=cat.png), got {item!r}")
        pairs.append((modality.strip(), Path(path)))
    return pairs


@dataclass
class Turn:
    """One exchange: the human text as the model reads it (placeholders included), the LLM positions of its
    inputs (`(tokens, hidden)` per input), the answer."""

    human: str
    inputs: dict[str, list[torch.Tensor]]
    answer: str


@dataclass
class ChatSession:
    """A conversation with a model: finished turns, the inputs attached to the next one, and the KV cache.

    Greedy decoding unless `temperature > 0`; sampling then draws from one generator seeded once, so a
    session with the same seed and messages is reproducible. `prefilled` counts the positions each turn fed
    to the model before its answer.
    """

    model: MultimodalLLM
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    turns: list[Turn] = field(default_factory=list)
    pending: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    prefilled: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.generator: torch.Generator | None = None
        self._forget()

    def _sampler(self, logits: torch.Tensor) -> torch.Generator | None:
        """The session's seeded generator, made at the first sampled turn on the logits' device: that is the LM
        head's (a GPU's, or the last layer's under a device map), not the embeddings', and `torch.multinomial`
        refuses a generator on another device."""
        if self.temperature > 0 and self.generator is None:
            self.generator = torch.Generator(device=logits.device).manual_seed(self.seed)
        return self.generator

    def attach(self, modality: str, path: str | Path) -> None:
        """Decode, process and encode a file now (so a bad file is reported at once) for the next human turn."""
        processed = self.model.example("", {modality: [Path(path).expanduser()]}, id=str(path)).inputs[modality]
        with torch.no_grad():
            positions = self.model.encode(modality, torch.stack(processed))
        self.pending.setdefault(modality, []).extend(positions.unbind(0))

    def reset(self) -> None:
        self.turns.clear()
        self.pending.clear()
        self.prefilled.clear()
        self._forget()

    def _forget(self) -> None:
        """Drop the cache: the next turn prefills the whole conversation."""
        self._state: DecodeState | None = None
        self._keys: list[tuple[int, int]] = []  # what each cached position is: (route, token id or input number)

    @torch.no_grad()
    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer `question` with the pending inputs, after the earlier turns; `on_text` receives the answer
        as it is generated. The turn is kept only if generation succeeds, so a bad message leaves the
        conversation (and the attachments waiting for it) as they were; a turn that fails after touching the
        cache drops it, and the next turn prefills the conversation afresh."""
        human = self._human_text(question)
        conversation = [message for turn in self.turns
                        for message in ({"from": "human", "value": turn.human}, {"from": "gpt", "value": turn.answer})]
        prompt, _ = self.model.format_conversation([*conversation, {"from": "human", "value": human}])
        inputs: dict[str, list[torch.Tensor]] = {}
        for part in [*(turn.inputs for turn in self.turns), self.pending]:
            for modality, positions in part.items():
                inputs.setdefault(modality, []).extend(positions)
        lengths = {modality: positions[0].shape[0] for modality, positions in inputs.items()}
        ids, routes, spans = self.model.assembler.layout(Example(prompt=prompt, inputs=inputs, id="message"), lengths)
        keys, sources = _position_keys(ids, routes, spans)
        stream = TextStream(self.model.tokenizer, on_text) if on_text is not None else None
        try:
            logits, fed = self._prefill(ids, routes, keys, sources, inputs)
            tokens = decode(self.model, self._state, logits, self.max_new_tokens, temperature=self.temperature,
                            generator=self._sampler(logits), on_token=stream)[0]
        except BaseException:
            self._forget()
            raise
        self._keys = keys + [(TEXT_ROUTE, token) for token in tokens[:-1]]  # the last token is never fed
        self.prefilled.append(fed)
        answer = self.model.answer_text(tokens).strip()
        if stream is not None:
            stream.finish()
        self.turns.append(Turn(human=human, inputs=self.pending, answer=answer))
        self.pending = {}
        return answer

    def _prefill(self, ids: list[int], routes: list[int], keys: list[tuple[int, int]],
                 sources: list[tuple[str, int, int, int]], inputs: dict[str, list[torch.Tensor]]
                 ) -> tuple[torch.Tensor, int]:
        """Cut the cache back to the prefix it shares with `keys` and feed the rest; the last position's logits
        and how many positions were fed."""
        shared = 0
        for cached, wanted in zip(self._keys, keys, strict=False):
            if cached != wanted:
                break
            shared += 1
        shared = min(shared, len(keys) - 1)  # at least one position is fed, for its logits
        device = self.model.device
        if self._state is None:
            self._state = DecodeState(cache=DynamicCache(), mask=torch.zeros(1, 0, dtype=torch.long, device=device),
                                      positions=torch.zeros(1, 1, dtype=torch.long, device=device))
        elif shared < self._state.length:
            self._state.crop(shared)
        self._keys = keys[:shared]
        embeds = self.model.llm.get_input_embeddings()(torch.tensor([ids[shared:]], device=device))
        for start, modality, number, length in sources:
            first, last = max(start, shared), start + length
            if first < last:
                values = inputs[modality][number][first - start:]
                embeds[0, first - shared:last - shared] = values.to(embeds.dtype)
        route_ids = torch.tensor([routes[shared:]], device=device)
        return feed(self.model, self._state, embeds, route_ids), len(ids) - shared

    def _human_text(self, question: str) -> str:
        """The question with one placeholder line per pending input, unless the user placed them already
        (then their count must match the inputs attached to this message)."""
        model_placeholders = {m.name: m.placeholder for m in self.model.spec.modalities}
        for name, modality in MODALITIES.items():
            if name not in model_placeholders and modality.placeholder in question:
                raise InputError(f"message: placeholder {modality.placeholder} is for modality {name!r}, which this "
                                 f"model does not have (it has: {', '.join(model_placeholders) or 'none'})")
        if any(placeholder in question for placeholder in model_placeholders.values()):
            # Checked per message: the model's own check counts the whole conversation, which misleads.
            for name, placeholder in model_placeholders.items():
                found, given = question.count(placeholder), len(self.pending.get(name, []))
                if found != given:
                    raise InputError(f"message: has {found} {placeholder} placeholder(s) but {given} {name} "
                                     f"input(s) are attached")
            return question
        # One line per input at the start of the turn, in registry order (image, audio, video, point for
        # the built-ins), as the training data has them; other modalities follow in attachment order.
        order = [m for m in MODALITIES if m in self.pending]
        order += [m for m in self.pending if m not in MODALITIES]
        lines = [model_placeholders[m] for m in order for _ in self.pending[m]]
        return "\n".join([*lines, question]) if question else "\n".join(lines)


def _position_keys(ids: list[int], routes: list[int], spans: list[tuple[str, int]]
                   ) -> tuple[list[tuple[int, int]], list[tuple[str, int, int, int]]]:
    """What each position of a laid-out conversation is, comparable with the cache's: `(TEXT_ROUTE, token id)`
    for text, `(route, k)` for the positions of the k-th input of a modality; and each input's span as
    `(start, modality, k, length)`."""
    keys: list[tuple[int, int]] = []
    sources: list[tuple[str, int, int, int]] = []
    numbers: dict[str, int] = {}
    remaining = 0
    pending_spans = iter(spans)
    for position, (token, route) in enumerate(zip(ids, routes, strict=True)):
        if route == TEXT_ROUTE:
            keys.append((TEXT_ROUTE, token))
            continue
        if remaining == 0:
            modality, remaining = next(pending_spans)
            number = numbers[modality] = numbers.get(modality, -1) + 1
            sources.append((position, modality, number, remaining))
        keys.append((route, number))
        remaining -= 1
    return keys, sources


class TextStream:
    """An `on_token` callback that turns token ids into text pieces as they arrive.

    Byte-level BPE splits a multi-byte character over several tokens, and a token's text can depend on its
    neighbours, so the accumulated ids are decoded every time and only the new suffix is emitted; while the
    decoded text ends in an incomplete character (U+FFFD) it is held back. What is shown equals the answer
    `generate` returns, stripped (it follows the template's ` ASSISTANT:` and is stored stripped).
    """

    def __init__(self, tokenizer: Any, write: Callable[[str], None]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, row: int, token_id: int) -> None:
        self.ids.append(token_id)
        self._emit(final=False)

    def finish(self) -> None:
        self._emit(final=True)

    def _emit(self, final: bool) -> None:
        # Trailing whitespace waits for the next word (the stored answer is stripped, so it may never come).
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text


def run_once(session: ChatSession, question: str, out: TextIO) -> str:
    """One-shot mode: stream the answer to `out`, then end the line."""
    answer = session.ask(question, lambda piece: _write(out, piece))
    _write(out, "\n")
    return answer


def run_repl(session: ChatSession, out: TextIO, err: TextIO, read: Callable[[str], str] = input) -> None:
    """Interactive mode: read messages and commands until /quit or end of input.

    Errors in a message or an attachment are printed as one line and the session goes on without that turn;
    Ctrl-C while an answer streams abandons that answer.
    """
    _write(out, f"modalities: {', '.join(session.model.branches) or 'none (text only)'}. "
                f"{commands_help(session.model)}\n")
    while True:
        try:
            line = read(PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            _write(out, "\n")
            return
        if not line:
            continue
        try:
            if line.startswith("/"):
                if _command(session, line, out):
                    return
            else:
                run_once(session, line, out)
        except MMComposeError as error:
            _write(err, f"error: {' '.join(str(error).split())}\n")
        except KeyboardInterrupt:
            _write(out, "\n[answer interrupted; not kept]\n")


def _command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a /command; True when the session should end."""
    name, _, argument = line[1:].partition(" ")
    argument = argument.strip()
    if name in ("quit", "exit"):
        return True
    if name == "reset":
        session.reset()
        _write(out, "conversation cleared\n")
    elif name == "help":
        _write(out, commands_help(session.model) + "\n")
    elif name in session.model.processors or name in MODALITIES:
        if not argument:
            raise MMComposeError(f"/{name} needs a file path")
        path = _unquote(argument)
        session.attach(name, path)
        _write(out, f"attached {name} {path} to your next message\n")
    else:
        raise MMComposeError(f"unknown command /{name}; {commands_help(session.model)}")
    return False


def _unquote(argument: str) -> str:
    """A path typed as-is, or quoted (as a shell would, for names with spaces)."""
    if argument[0] in "'\"":
        try:
            parts = shlex.split(argument)
        except ValueError as error:
            raise MMComposeError(f"cannot parse path {argument}: {error}") from None
        if len(parts) == 1:
            return parts[0]
    return argument


def _write(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()


def chat(model: MultimodalLLM, attachments: list[tuple[str, Path]], question: str | None, *, max_new_tokens: int,
         temperature: float, seed: int) -> None:
    """The `chat` command: attach the command line's files to the first message, then answer `question`
    (one-shot) or start the interactive session."""
    session = ChatSession(model, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    for modality, path in attachments:
        session.attach(modality, path)
    if question is None:
        with contextlib.suppress(ImportError):  # gives input() line editing and history where available
            import readline  # noqa: F401
        run_repl(session, sys.stdout, sys.stderr)
    else:
        run_once(session, question, sys.stdout)
