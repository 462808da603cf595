"""Turn a model's free-form answer into something a benchmark can score.

Generative models rarely answer with a bare letter or label, so scoring must read what they meant
without rewarding guesses: every parser here prefers returning ``None`` (unparseable, scored wrong)
to picking one of two readings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

DEFAULT_LETTERS = "ABCD"
"""Option letters assumed when a question's options are unknown (MCUB and AVQA have four)."""

_ARTICLES = frozenset({"a", "an", "the"})

# Words that may follow an option letter that is also an English word ("A", "I"), e.g. "A because ...",
# "A or B", "A is correct". After any other word the letter is read as the article/pronoun ("A blorvin").
# fmt: off
_LETTER_FOLLOWERS = frozenset({
    "or", "and", "is", "was", "because", "since", "as", "seems", "would", "should", "could", "might",
    "must", "fits", "matches", "appears",
})
# fmt: on
_WORD_LETTERS = frozenset("AI")

_WHOLE_LETTER = re.compile(r"[\W_]*([A-Za-z])[\W_]*")
_MARKER = re.compile(
    r"\b(?:answer|option|choice)\b"
    r"(?:\s+(?:is|would\s+be|should\s+be|must\s+be|will\s+be|seems\s+to\s+be))?"
    r"\s*[:=-]?\s*(?:(?:option|choice)\s*)?[(\[*\"'`]*\s*"
    r"(?P<first>[A-Za-z])\b"
    r"(?:[)\]*\"'`]*\s*(?:or|and|/|,)\s*[(\[*\"'`]*\s*(?P<second>[A-Za-z])\b)?",
    re.IGNORECASE,
)
_WRAPPED = re.compile(r"(?<![A-Za-z0-9])[(\[]\s*([A-Za-z])\s*[)\]]|\*\*\s*([A-Za-z])\s*\*\*")
_LINE_LABEL = re.compile(r"^[ \t*_#>-]*\(?([A-Za-z])[.):][*_]*(?=\s|$)", re.MULTILINE)
_LONE_UPPER = re.compile(r"(?<![\w.'’-])([A-Z])(?![\w'’-]|\.\w)")
_FIRST_TOKEN = re.compile(r"^[\s*_#>\"'`-]*([A-Z])(?=\s)")
_NEXT_WORD = re.compile(r"\s+([A-Za-z]+)")

_OPTION_LABEL = re.compile(r"(?:^|(?<=[\s:;,]))(?:(\()([A-Z])\)|([A-Z])([.)]))[ \t]*", re.MULTILINE)


def parse_options(question: str) -> dict[str, str]:
    """Read the lettered options of a multiple-choice question.

    Accepts ``A. x``, ``A) x`` and ``(A) x``, one per line or several on one line; an option's text runs
    to the next label or the end of its line. Labels must run A, B, C, ... in order and in one style,
    which keeps a stray "C." inside an option's text from starting a new option; a fresh run that starts
    with an ``A`` label at the start of a line replaces a shorter earlier one (instructions that mention
    "A." before the real list). Returns ``{}`` unless at least two options are found, because one "A."
    is more likely prose than a choice list.
    """
    best: dict[str, str] = {}
    run: dict[str, str] = {}
    last: tuple[str, int] | None = None  # the current run's latest label and where its text starts
    style: tuple[str | None, ...] = ()
    for m in _OPTION_LABEL.finditer(question):
        letter = m.group(2) or m.group(3)
        line_start = question.rfind("\n", 0, m.start()) + 1
        starts_run = letter == "A" and (last is None or not question[line_start : m.start()].strip())
        continues_run = last is not None and letter == chr(ord(last[0]) + 1) and style == m.group(1, 4)
        if not (starts_run or continues_run):
            continue
        style = m.group(1, 4)
        if last is not None:
            run[last[0]] = _option_text(question[last[1] : m.start()])
        if starts_run:
            best = run if len(run) >= len(best) else best
            run = {}
        last = (letter, m.end())
    if last is not None:
        run[last[0]] = _option_text(question[last[1] :])
        best = run if len(run) >= len(best) else best
    return best if len(best) >= 2 else {}


def _option_text(span: str) -> str:
    return span.split("\n", 1)[0].strip().rstrip(";,").strip()


def extract_choice(text: str, options: Mapping[str, str] | None = None) -> str | None:
    """Return the option letter (upper case) that a free-form answer picks, or ``None``.

    Evidence is read in tiers, strongest first. The first tier that finds anything decides: one distinct
    letter is the answer, two or more make the answer ambiguous (``None``), so a weaker tier never
    overrides a stronger one.

    1. Explicit letters: the whole answer is one letter give or take punctuation and markup (``B``,
       ``b``, ``(B)``, ``B.``, ``**C**``); a marker phrase (``Answer: B``, ``the answer is (c)``,
       ``Option C``, including ``answer is A or B``, which is ambiguous); a bracketed or bold letter
       anywhere (``(C)``, ``[C]``, ``**C**``); a letter label at the start of a line (``C. lives in the
       desert``, ``B) ...``).
    2. Option text (needs ``options``): after :func:`normalize_vqa` on both sides, an option's text is
       the whole answer or a whole phrase within it. An option found only inside a longer matched option
       ("red" inside "dark red") does not count.
    3. A lone upper-case letter token (``I'd go with C``), ignoring abbreviations like ``U.S.A.``.
    4. Last resort: the answer starts with an upper-case option letter used as a word (``A blorvin is
       red`` -> ``A``), taken only when nothing above found anything.

    Where a letter has no brackets or punctuation of its own (marker phrases, tier 3), an ``A``/``I``
    followed by an ordinary word is read as the article or pronoun, not a letter ("the answer is a
    bird"); followers like "or", "is", "because" keep it a letter. Only letters
    that are options count: the keys of ``options``, else :data:`DEFAULT_LETTERS`.
    """
    letters = {k.upper() for k in options} if options else set(DEFAULT_LETTERS)
    tiers: tuple[Callable[[], set[str]], ...] = (
        lambda: _explicit_letters(text, letters),
        lambda: _option_text_letters(text, options or {}),
        lambda: _lone_letters(text, letters),
        lambda: _leading_word_letter(text, letters),
    )
    for tier in tiers:
        found = tier()
        if found:
            return found.pop() if len(found) == 1 else None
    return None


def _used_as_word(text: str, letter: str, end: int) -> bool:
    """Whether the letter ending at ``end`` reads as the article "a" or pronoun "I" rather than a choice."""
    if letter.upper() not in _WORD_LETTERS:
        return False
    m = _NEXT_WORD.match(text, end)
    return m is not None and m.group(1).lower() not in _LETTER_FOLLOWERS


def _explicit_letters(text: str, letters: set[str]) -> set[str]:
    whole = _WHOLE_LETTER.fullmatch(text)
    if whole:
        return {whole.group(1).upper()} & letters
    found: set[str] = set()
    for m in _MARKER.finditer(text):
        for group in ("first", "second"):
            if m.group(group) and not _used_as_word(text, m.group(group), m.end(group)):
                found.add(m.group(group).upper())
    for m in _WRAPPED.finditer(text):
        found.add((m.group(1) or m.group(2)).upper())
    for m in _LINE_LABEL.finditer(text):
        found.add(m.group(1).upper())
    return found & letters


def _option_text_letters(text: str, options: Mapping[str, str]) -> set[str]:
    answer = normalize_vqa(text).split()
    spans: list[tuple[int, int, str]] = []
    for letter, option in options.items():
        needle = normalize_vqa(option).split()
        if not needle:
            continue
        spans.extend(
            (i, i + len(needle), letter.upper())
            for i in range(len(answer) - len(needle) + 1)
            if answer[i : i + len(needle)] == needle
        )
    return {s[2] for s in _outermost(spans)}


def _outermost(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Drop every match that lies strictly inside a longer match of a different candidate."""
    return [
        s
        for s in spans
        if not any(o[2] != s[2] and o[0] <= s[0] and s[1] <= o[1] and o[1] - o[0] > s[1] - s[0] for o in spans)
    ]


def _lone_letters(text: str, letters: set[str]) -> set[str]:
    return {m.group(1) for m in _LONE_UPPER.finditer(text) if not _used_as_word(text, m.group(1), m.end(1))} & letters


def _leading_word_letter(text: str, letters: set[str]) -> set[str]:
    m = _FIRST_TOKEN.match(text)
    return {m.group(1)} & letters if m else set()


# The VQA evaluation's number map, extended to twenty and the tens (it stops at ten).
# fmt: off
_NUMBERS = {
    "none": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
    "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
    "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
}
# fmt: on
_TENS = frozenset(w for w, n in _NUMBERS.items() if n >= 20)
_UNITS = frozenset(w for w, n in _NUMBERS.items() if 1 <= n <= 9)

# Contractions are expanded (not re-apostrophised as in the VQA script); both sides get the same form.
_APOSTROPHE_CONTRACTIONS = (
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\bcan't\b"), "can not"),
    (re.compile(r"\bshan't\b"), "shall not"),
    (re.compile(r"\blet's\b"), "let us"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'re\b"), " are"),
    (re.compile(r"'ve\b"), " have"),
    (re.compile(r"'ll\b"), " will"),
    (re.compile(r"'m\b"), " am"),
    (re.compile(r"'d\b"), " would"),
    (re.compile(r"\b(it|he|she|that|there|here|what|who|where|how)'s\b"), r"\1 is"),
)
# Apostrophe-less spellings that are not English words themselves ("cant", "wont", "its" are).
# fmt: off
_BARE_CONTRACTIONS = {
    "dont": "do not", "doesnt": "does not", "didnt": "did not", "isnt": "is not", "arent": "are not",
    "wasnt": "was not", "werent": "were not", "hasnt": "has not", "havent": "have not", "hadnt": "had not",
    "couldnt": "could not", "wouldnt": "would not", "shouldnt": "should not", "mustnt": "must not",
    "cannot": "can not", "im": "i am", "ive": "i have", "youre": "you are", "theyre": "they are",
    "thats": "that is", "whats": "what is", "theres": "there is",
}
# fmt: on
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_VQA_TOKEN = re.compile(r"\d+(?:\.\d+)+|\.\d+|[^\W_]+")


def normalize_vqa(text: str) -> str:
    """VQA-style normalisation, so that "Three dogs." and "3 dogs" compare equal.

    Lower-cases; expands contractions; drops thousands separators; turns every other punctuation mark
    into a word break except a decimal point inside a number ("2.5" stays "2.5"); maps number words to
    digits ("three" -> "3", "twenty one" -> "21", and, as in the VQA script, "none" -> "0"); removes
    the articles a/an/the; collapses whitespace.
    """
    text = text.lower().replace("’", "'").replace("‘", "'")
    for pattern, replacement in _APOSTROPHE_CONTRACTIONS:
        text = pattern.sub(replacement, text)
    text = _THOUSANDS_COMMA.sub("", text.replace("'", ""))
    words: list[str] = []
    for token in _VQA_TOKEN.findall(text):
        if token in _UNITS and words and words[-1] in _TENS:
            words[-1] = str(_NUMBERS[words[-1]] + _NUMBERS[token])
            continue
        words.extend(_BARE_CONTRACTIONS.get(token, token).split())
    return " ".join(str(_NUMBERS[w]) if w in _NUMBERS else w for w in words if w not in _ARTICLES)


def vqa_match(pred: str, gold: str) -> bool:
    """Exact match after :func:`normalize_vqa`; an answer that normalises to nothing never matches."""
    normalized = normalize_vqa(pred)
    return bool(normalized) and normalized == normalize_vqa(gold)


_IRREGULAR_PLURALS = {"people": "person", "men": "man", "women": "woman", "children": "child"}


def _singular(word: str) -> str:
    """A crude English singular, enough for object class names ("chairs", "boxes", "shelves")."""
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    if word.endswith("lves"):
        return word[:-3] + "f"
    if word.endswith(("ss", "us", "is")) or len(word) < 4:
        return word
    return word[:-1] if word.endswith("s") else word


def _label_tokens(text: str) -> list[str]:
    text = text.lower().replace("’", "").replace("'", "")
    return [_singular(t) for t in re.findall(r"[^\W_]+", text) if t not in _ARTICLES]


def label_key(label: str) -> str:
    """The form two spellings of a class name share: "night_stand", "Night stands", "nightstand"."""
    return "".join(_label_tokens(label))


Similarity = Callable[[str, Sequence[str]], Sequence[float]]
"""``(prediction, labels) -> one score per label``, higher is closer (e.g. a local embedding model)."""


def match_label(pred: str, labels: Sequence[str], similarity: Similarity | None = None) -> str | None:
    """Return the label of ``labels`` that a free-form prediction names, or ``None``.

    Labels and prediction are compared as :func:`label_key` (case, ``_``/``-``/spaces, articles and
    plurals do not matter; labels with the same key are one class, named by the first). In order:

    1. the whole prediction is a label;
    2. labels appearing as a whole word or phrase in the prediction ("It is a night stand."), spaces
       optional ("book shelf" names "bookshelf"); a label found only inside a longer found label is
       dropped ("night stand" beats "stand"), and two labels that remain make the answer ambiguous;
    3. if nothing matched and ``similarity`` is given, the single best-scoring label (a tie gives None).
    """
    by_key: dict[str, str] = {}
    for label in labels:
        if label_key(label):
            by_key.setdefault(label_key(label), label)
    tokens = _label_tokens(pred)
    whole = by_key.get("".join(tokens))
    if whole is not None:
        return whole
    longest = max((len(k) for k in by_key), default=0)
    spans: list[tuple[int, int, str]] = []
    for i in range(len(tokens)):
        joined = ""
        for j in range(i, len(tokens)):
            joined += tokens[j]
            if len(joined) > longest:
                break
            if joined in by_key:
                spans.append((i, j + 1, by_key[joined]))
    found = {s[2] for s in _outermost(spans)}
    if found:
        return found.pop() if len(found) == 1 else None
    if similarity is None or not labels:
        return None
    scores = list(similarity(pred, labels))
    if len(scores) != len(labels):
        raise ValueError(f"similarity returned {len(scores)} scores for {len(labels)} labels")
    best = max(scores)
    return by_key.get(label_key(labels[scores.index(best)])) if scores.count(best) == 1 else None
