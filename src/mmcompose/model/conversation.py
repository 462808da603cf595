"""Conversation templates: a list of turns -> the text the model reads, with every answer it is trained on.

Three kinds. `plain` is LLaVA's caption layout for stage 1: the human turn reduced to its input placeholders,
then the caption and `\n`, no role tags and no end-of-sequence token. The role-tagged layouts in `TEMPLATES`:
`vicuna_v1` (LLaVA-1.5's and ModelCompose's) and `tagged` (USER / ASSISTANT tags without a system prompt; the
demo's models use it). `chat` is the base tokenizer's own Jinja chat template rendered by transformers'
`apply_chat_template`; a `chat` model records the template text in its spec (`ModelSpec.chat_template`), so
inference renders prompts with exactly the template training used even if the base directory's tokenizer
later changes.

Every assistant turn is a target, as LLaVA's masking labels them: an earlier answer with the text that closes
its turn (`</s>` in `vicuna_v1`), the last answer followed by the end-of-sequence token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mmcompose.errors import MMComposeError


@dataclass(frozen=True)
class Template:
    system: str
    user: str
    assistant: str
    turn_separator: str


TEMPLATES: dict[str, Template] = {
    "tagged": Template(system="", user="USER: ", assistant=" ASSISTANT:", turn_separator="\n"),
    "vicuna_v1": Template(
        system="A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. ",
        user="USER: ",
        assistant=" ASSISTANT:",
        turn_separator="</s>",
    ),
}


PLAIN, CHAT = "plain", "chat"
TEMPLATE_NAMES = (PLAIN, *TEMPLATES, CHAT)
ROLES = {"human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class Formatted:
    """A rendered conversation. `prompt` is everything before the last answer (earlier answers included),
    `target` the last answer (None when the conversation ends with a human turn), `answers` the character
    spans of the earlier answers in `prompt`, which train like the target, and `eos` whether the target ends
    with the end-of-sequence token."""

    prompt: str
    target: str | None
    answers: tuple[tuple[int, int], ...] = ()
    eos: bool = True


def tokenizer_chat_template(tokenizer: Any, source: str = "the base tokenizer") -> str:
    """The tokenizer's own chat template (its `default` one where it has several), or a one-line error."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise MMComposeError(f"template {CHAT!r}: {source} has no chat template; choose one of "
                             f"{', '.join((PLAIN, *TEMPLATES))}")
    return template


def _speaker(turn: dict[str, str]) -> str:
    speaker = turn.get("from")
    if speaker not in ROLES:
        raise MMComposeError(f"conversation turn from {speaker!r}; expected 'human' or 'gpt'")
    return speaker


def _formatted(segments: list[tuple[str, bool]], ends_with_answer: bool, eos: bool = True) -> Formatted:
    """`segments` (text, is an answer) in order -> `Formatted`; the last segment is the target if
    `ends_with_answer`."""
    target = segments.pop()[0] if ends_with_answer else None
    prompt, answers = "", []
    for text, answer in segments:
        if answer:
            answers.append((len(prompt), len(prompt) + len(text)))
        prompt += text
    return Formatted(prompt, target, tuple(answers), eos)


def render_conversation(turns: list[dict[str, str]], template: str = "tagged", tokenizer: Any = None,
                        chat_template: str | None = None, placeholders: Sequence[str] = ()) -> Formatted:
    """Render `[{from: human|gpt, value}]` in `template`, every answer marked as a target.

    Template `chat` needs the `tokenizer` and the Jinja `chat_template` text (see `render_chat`); `plain`
    needs the model's input `placeholders` (the human turn keeps only those).
    """
    if template == CHAT:
        if tokenizer is None or chat_template is None:
            raise MMComposeError(f"template {CHAT!r} needs the tokenizer and its recorded chat template")
        return render_chat(turns, tokenizer, chat_template)
    if template == PLAIN:
        return _render_plain(turns, placeholders)
    if template not in TEMPLATES:
        raise MMComposeError(f"unknown conversation template {template!r}; known: {', '.join(TEMPLATE_NAMES)}")
    style = TEMPLATES[template]
    segments = [(style.system, False)]
    for index, turn in enumerate(turns):
        if _speaker(turn) == "human":
            segments.append((style.user + turn["value"] + style.assistant, False))
        else:
            closing = "" if index == len(turns) - 1 else style.turn_separator
            segments.append((" " + turn["value"] + closing, True))
    return _formatted(segments, bool(turns) and turns[-1].get("from") == "gpt")


def _render_plain(turns: list[dict[str, str]], placeholders: Sequence[str]) -> Formatted:
    """LLaVA's `plain`: one human turn, reduced to its placeholders in order, then the answer and `\n`."""
    speakers = [_speaker(turn) for turn in turns]
    if speakers not in (["human"], ["human", "gpt"]):
        raise MMComposeError(f"template {PLAIN!r} takes one human turn and its answer (a caption), got "
                             f"{' -> '.join(speakers) or 'no turns'}")
    found = re.findall("|".join(map(re.escape, placeholders)), turns[0]["value"]) if placeholders else []
    segments = [("".join(found), False)]
    if len(turns) == 2:
        segments.append((turns[1]["value"] + "\n", True))
    return _formatted(segments, len(turns) == 2, eos=False)


def format_conversation(turns: list[dict[str, str]], template: str = "tagged", tokenizer: Any = None,
                        chat_template: str | None = None, placeholders: Sequence[str] = ()) -> tuple[str, str | None]:
    """`(prompt, target)` of `render_conversation`: what inference reads and the last answer."""
    rendered = render_conversation(turns, template, tokenizer, chat_template, placeholders)
    return rendered.prompt, rendered.target


def _messages(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": ROLES[_speaker(turn)], "content": turn["value"]} for turn in turns]


def _render(tokenizer: Any, chat_template: str, turns: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(_messages(turns), chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except MMComposeError:
        raise
    except Exception as error:  # jinja2 raises TemplateError (or its `raise_exception` messages) on bad turns
        raise MMComposeError(f"the chat template cannot render this conversation: {error}") from None


def render_chat(turns: list[dict[str, str]], tokenizer: Any, chat_template: str) -> Formatted:
    """`render_conversation` with a tokenizer's Jinja chat template, rendered by `apply_chat_template`.

    Each answer is exactly the text the template adds after the generation prompt of the turns before it
    when the answer is included: the answer plus the template's end-of-turn text. The conversation is
    rendered turn by turn, so the template must render a conversation as a prefix of its continuation
    (ChatML, Llama and Mistral templates do; one that rewrites earlier turns is refused). Two adjustments keep
    the token sequence the template describes under the assembler, which prepends the BOS id and appends the
    EOS id itself: a leading BOS text is dropped from the prompt, and the last answer ends right before the
    first EOS text after it (a template that closes turns with the EOS token, e.g. `</s>`, would otherwise end
    with it twice). A template that closes turns with another token (ChatML's `<|im_end|>` on a base whose EOS
    is `<|endoftext|>`) keeps it in the target, so the labels are the answer, the end-of-turn text, then EOS.
    Placeholders such as `<image>` are plain text to the template and come out unchanged.
    """
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for index, turn in enumerate(turns):
        if _speaker(turn) != "gpt":
            continue
        prompt = _render(tokenizer, chat_template, turns[:index], generation_prompt=True)
        full = _render(tokenizer, chat_template, turns[:index + 1], generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise MMComposeError("the chat template renders an answer's turn differently from its generation "
                                 "prompt or rewrites earlier turns, so the answers cannot be separated from the "
                                 "prompt; choose another template")
        answer = full[len(prompt):]
        if index == len(turns) - 1:
            eos, value = tokenizer.eos_token, turn["value"]
            start = answer.find(value)
            cut = answer.find(eos, start + len(value) if start >= 0 else 0) if eos else -1
            if cut >= 0:
                answer = answer[:cut]
        segments += [(prompt[len(rendered):], False), (answer, True)]
        rendered = full
    ends_with_answer = bool(turns) and turns[-1].get("from") == "gpt"
    if not ends_with_answer:
        prompt = _render(tokenizer, chat_template, turns, generation_prompt=True)
        if not prompt.startswith(rendered):
            raise MMComposeError("the chat template rewrites earlier turns, so the answers cannot be separated "
                                 "from the prompt; choose another template")
        segments.append((prompt[len(rendered):], False))
    bos = tokenizer.bos_token
    if bos and tokenizer.bos_token_id is not None and segments and segments[0][0].startswith(bos):
        segments[0] = (segments[0][0][len(bos):], segments[0][1])
    return _formatted(segments, ends_with_answer)
