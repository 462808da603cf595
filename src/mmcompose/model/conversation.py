"""Conversation templates: a list of turns -> (prompt, target), as the models were trained to read them."""

from __future__ import annotations

from dataclasses import dataclass

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


def format_conversation(turns: list[dict[str, str]], template: str = "plain") -> tuple[str, str | None]:
    """Render `[{from: human|gpt, value}]` into the prompt the model reads and the target it should write.

    The last gpt turn (if the conversation ends with one) is the target; earlier gpt turns are context.
    """
    if template not in TEMPLATES:
        raise MMComposeError(f"unknown conversation template {template!r}; known: {', '.join(TEMPLATES)}")
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
