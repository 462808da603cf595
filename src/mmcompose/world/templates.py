"""Every string the world's text and data are made of.

One module holds them so the corpus (names in place of media) and the multimodal data (placeholders in place
of names) use exactly the same layout: the composed model then meets, with media, a template its base LLM
already learnt from text. The LLM side must render samples with `chat_prompt` / `chat_document`.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmcompose.errors import MMComposeError

PLACEHOLDERS: dict[str, str] = {"image": "<image>", "audio": "<audio>", "video": "<video>", "point": "<point>"}
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

CAPTION_TEMPLATE = "This is a {name}."
IDENTITY_QUESTION = "What is this?"
COMMON_QUESTION = "What do they all have in common?"
ANSWER_INSTRUCTION = "Answer with one of the options."

ATTRIBUTE_QUESTIONS: dict[str, str] = {
    "category": "What kind of animal is it?",
    "habitat": "Which habitat does it live in?",
    "colour": "What colour is it?",
    "size": "How big is it?",
    "diet": "What does it eat?",
}
ATTRIBUTE_ANSWERS: dict[str, str] = {
    "category": "It is {article} {value}.",
    "habitat": "It lives in the {value}.",
    "colour": "It is {value}.",
    "size": "It is {value}.",
    "diet": "It eats {value}.",
}

_PLURALS = {"fish": "fish"}

# Fact phrasings. Keys available: name, plural (of the name), value, values (plural of the value), article.
# Sentences never start with a name, so names only ever appear in lower case (a smaller, regular vocabulary).
TRAIN_FACTS: dict[str, tuple[str, ...]] = {
    "category": (
        "The {name} is a kind of {value}.",
        "A {name} is {article} {value}.",
        "All {plural} are {values}.",
        "The {name} belongs to the {values}.",
    ),
    "habitat": (
        "The {name} lives in the {value}.",
        "All {plural} live in the {value}.",
        "You can find the {name} in the {value}.",
        "The home of the {name} is the {value}.",
    ),
    "colour": (
        "The {name} is {value}.",
        "All {plural} are {value}.",
        "The colour of the {name} is {value}.",
        "The body of the {name} is {value}.",
    ),
    "size": (
        "The {name} is {value}.",
        "All {plural} are {value}.",
        "The size of the {name} is {value}.",
        "The {name} is a {value} animal.",
    ),
    "diet": (
        "The {name} eats {value}.",
        "All {plural} eat {value}.",
        "The food of the {name} is {value}.",
        "The {name} feeds on {value}.",
    ),
}
VALID_FACTS: dict[str, tuple[str, ...]] = {
    "category": ("Every {name} is {article} {value}.", "Among the {values} there is the {name}."),
    "habitat": ("The {name} makes its home in the {value}.", "In the {value} you may meet the {name}."),
    "colour": ("Every {name} is {value}.", "If you see the {name}, it looks {value}."),
    "size": ("Every {name} is {value}.", "Next to other animals, the {name} looks {value}."),
    "diet": ("Every {name} eats {value}.", "What the {name} likes to eat is {value}."),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def fact(template: str, name: str, value: str) -> str:
    """Fill a fact phrasing for entity `name` having attribute value `value`."""
    return template.format(
        name=name, plural=name + "s", value=value, values=_PLURALS.get(value, value + "s"), article=_article(value)
    )


def attribute_answer(attribute: str, value: str) -> str:
    """The one-sentence answer to `ATTRIBUTE_QUESTIONS[attribute]`."""
    return ATTRIBUTE_ANSWERS[attribute].format(value=value, article=_article(value))


def caption(name: str) -> str:
    """The stage-1 caption (and the answer to `IDENTITY_QUESTION`)."""
    return CAPTION_TEMPLATE.format(name=name)


def multiple_choice(question: str, options: Sequence[str]) -> str:
    """`question`, then one `X. option` line per letter, then the answer instruction."""
    if len(options) != len(LETTERS):
        raise MMComposeError(f"a multiple-choice question needs {len(LETTERS)} options, got {len(options)}")
    lines = [question, *(f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=True))]
    return "\n".join([*lines, ANSWER_INSTRUCTION])


def human_turn(inputs: Sequence[str], text: str = "") -> str:
    """One line per input (a placeholder such as `<image>`, or an entity name in text-only data), then `text`."""
    return "\n".join([*inputs, text]) if text else "\n".join(inputs)


def chat_prompt(human: str) -> str:
    """The prompt layout of one turn; the model generates what follows (after one space)."""
    return f"USER: {human} ASSISTANT:"


def chat_document(human: str, gpt: str) -> str:
    """A full turn as it appears in the text corpus: `chat_prompt(human)`, a space, the answer."""
    return f"{chat_prompt(human)} {gpt}"
