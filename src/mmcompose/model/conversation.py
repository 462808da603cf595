"""Conversation templates: a list of turns -> (prompt, target), as the models were trained to read them.

Two kinds: the fixed text layouts in `TEMPLATES` (`plain`, `vicuna_v1`), and `chat`, the base tokenizer's own
Jinja chat template rendered by transformers' `apply_chat_template`. A `chat` model records the template text
in its spec (`ModelSpec.chat_template`), so inference renders prompts with exactly the template training used
even if the base directory's tokenizer later changes.
"""

from __future__ import annotations

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
    "plain": Template(system="", user="USER: ", assistant=" ASSISTANT:", turn_separator="\n"),
    "vicuna_v1": Template(
        system="A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. ",
        user="USER: ",
        assistant=" ASSISTANT:",
        turn_separator="</s>",
    ),
}


CHAT = "chat"
TEMPLATE_NAMES = (*TEMPLATES, CHAT)
ROLES = {"human": "user", "gpt": "assistant"}


def tokenizer_chat_template(tokenizer: Any, source: str = "the base tokenizer") -> str:
    """The tokenizer's own chat template (its `default` one where it has several), or a one-line error."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise MMComposeError(f"template {CHAT!r}: {source} has no chat template; choose one of "
                             f"{', '.join(TEMPLATES)}")
    return template


def format_conversation(turns: list[dict[str, str]], template: str = "plain", tokenizer: Any = None,
                        chat_template: str | None = None) -> tuple[str, str | None]:
    """Render `[{from: human|gpt, value}]` into the prompt the model reads and the target it should write.

    The last gpt turn (if the conversation ends with one) is the target; earlier gpt turns are context.
    Template `chat` needs the `tokenizer` and the Jinja `chat_template` text (see `format_chat`).
    """
    if template == CHAT:
        if tokenizer is None or chat_template is None:
            raise MMComposeError(f"template {CHAT!r} needs the tokenizer and its recorded chat template")
        return format_chat(turns, tokenizer, chat_template)
    if template not in TEMPLATES:
        raise MMComposeError(f"unknown conversation template {template!r}; known: {', '.join(TEMPLATE_NAMES)}")
    style = TEMPLATES[template]
    target = None
    if turns and turns[-1].get("from") == "gpt":
        target = turns[-1]["value"]
        turns = turns[:-1]
    prompt = style.system
    for turn in turns:
        speaker = turn.get("from")
        if speaker == "human":
            prompt += style.user + turn["value"] + style.assistant
        elif speaker == "gpt":
            prompt += " " + turn["value"] + style.turn_separator
        else:
            raise MMComposeError(f"conversation turn from {speaker!r}; expected 'human' or 'gpt'")
    return prompt, None if target is None else " " + target


def _messages(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    messages = []
    for turn in turns:
        speaker = turn.get("from")
        if speaker not in ROLES:
            raise MMComposeError(f"conversation turn from {speaker!r}; expected 'human' or 'gpt'")
        messages.append({"role": ROLES[speaker], "content": turn["value"]})
    return messages


def _render(tokenizer: Any, chat_template: str, turns: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(_messages(turns), chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except MMComposeError:
        raise
    except Exception as error:  # jinja2 raises TemplateError (or its `raise_exception` messages) on bad turns
        raise MMComposeError(f"the chat template cannot render this conversation: {error}") from None


def format_chat(turns: list[dict[str, str]], tokenizer: Any, chat_template: str) -> tuple[str, str | None]:
    """`format_conversation` with a tokenizer's Jinja chat template, rendered by `apply_chat_template`.

    The prompt is the template's rendering of every turn before the answer with the generation prompt; the
    target is exactly the text the template puts after that prompt when the answer is included: the answer
    plus the template's end-of-turn text. Two adjustments keep the token sequence the template describes under
    the assembler, which prepends the BOS id and appends the EOS id itself: a leading BOS text is dropped from
    the prompt, and the target ends right before the first EOS text after the answer (a template that closes
    turns with the EOS token, e.g. `</s>`, would otherwise end with it twice). A template that closes turns with
    another token (ChatML's `<|im_end|>` on a base whose EOS is `<|endoftext|>`) keeps it in the target, so the
    labels are the answer, the end-of-turn text, then EOS. Placeholders such as `<image>` are plain text to the
    template and come out unchanged.
    """
    target = None
    if turns and turns[-1].get("from") == "gpt":
        prompt = _render(tokenizer, chat_template, turns[:-1], generation_prompt=True)
        full = _render(tokenizer, chat_template, turns, generation_prompt=False)
        if not full.startswith(prompt):
            raise MMComposeError("the chat template renders the answer's turn differently from its generation "
                                 "prompt, so the answer cannot be separated from the prompt; choose another template")
        target = full[len(prompt):]
        answer, eos = turns[-1]["value"], tokenizer.eos_token
        start = target.find(answer)
        cut = target.find(eos, start + len(answer) if start >= 0 else 0) if eos else -1
        if cut >= 0:
            target = target[:cut]
    else:
        prompt = _render(tokenizer, chat_template, turns, generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and tokenizer.bos_token_id is not None and prompt.startswith(bos):
        prompt = prompt[len(bos):]
    return prompt, target
