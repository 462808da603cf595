"""Answer parsing on hand-made tricky answers; every expected value is written by hand."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmcompose.eval.answers import extract_choice, match_label, normalize_vqa, parse_options, vqa_match

OPTIONS = {"A": "has wings", "B": "lives in the desert", "C": "is red", "D": "eats fish"}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("**C**", "C"),
        ("Answer: B", "B"),
        ("The answer is B.", "B"),
        ("the answer is (c)", "C"),
        ("The answer is c.", "C"),
        ("Option C", "C"),
        ("The correct option is **D**, since it eats fish.", "D"),
        ("Answer: A because they all have wings", "A"),
        ("I'd go with C", "C"),
        # option text alone, any case and punctuation
        ("lives in the desert", "B"),
        ("Lives in the desert!", "B"),
        ("They all live in the desert.", None),  # "live" is not the option's "lives": no guessing
        ("All of them lives in the desert", "B"),
        # a leading label beats the text that follows it
        ("C. lives in the desert", "C"),
        ("B. lives in the desert", "B"),
        ("**B.** lives in the desert", "B"),
        # "A" as an article is not option A when anything better exists
        ("A blorvin is red", "C"),
        ("A blorvin lives in the desert.", "B"),
        ("The answer is a blorvin.", None),
        # ambiguous
        ("A or B", None),
        ("The answer is A or B.", None),
        ("(A) has wings (B) lives in the desert", None),
        ("It has wings and lives in the desert", None),
        ("B. Actually, the answer is C.", None),
        # not an option
        ("E", None),
        ("The answer is E.", None),
        ("I don't know", None),
        ("", None),
        ("The U.S.A. is big", None),
    ],
)
def test_extract_choice(answer: str, expected: str | None) -> None:
    assert extract_choice(answer, OPTIONS) == expected


def test_extract_choice_article_is_last_resort() -> None:
    # Nothing else in the answer points anywhere, so the leading "A" is taken.
    assert extract_choice("A blorvin", OPTIONS) == "A"
    assert extract_choice("A blorvin is red", None) == "A"
    # Lower-case "a" is never read as a letter inside prose.
    assert extract_choice("it is a blorvin", OPTIONS) is None


def test_extract_choice_without_options_uses_a_to_d() -> None:
    assert extract_choice("The answer is (d)", None) == "D"
    assert extract_choice("lives in the desert", None) is None
    assert extract_choice("E", None) is None


def test_extract_choice_respects_option_letters() -> None:
    five = {**OPTIONS, "E": "sings"}
    assert extract_choice("E", five) == "E"
    assert extract_choice("sings", five) == "E"
    assert extract_choice("Answer: D", {"A": "x", "B": "y"}) is None


def test_extract_choice_nested_option_text_prefers_the_longer_option() -> None:
    options = {"A": "red", "B": "dark red", "C": "blue"}
    assert extract_choice("It is dark red.", options) == "B"
    assert extract_choice("red", options) == "A"
    assert extract_choice("red or blue", options) is None


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        (
            "<image><audio><video> What do they have in common?\nA. has wings\nB. lives in the desert\n"
            "C. is red\nD. eats fish\nAnswer with the option's letter from the given choices directly.",
            {"A": "has wings", "B": "lives in the desert", "C": "is red", "D": "eats fish"},
        ),
        ("Pick one.\n(A) red\n(B) blue\n(C) green", {"A": "red", "B": "blue", "C": "green"}),
        ("Pick one: A) red B) blue C) green", {"A": "red", "B": "blue", "C": "green"}),
        # a stray "C." of another style inside an option does not start option C
        ("Options: (A) red (B) vitamin C. tablets (C) green", {"A": "red", "B": "vitamin C. tablets", "C": "green"}),
        # instructions mentioning "A." before the real list
        ("Reply with A. or B.\nA) one\nB) two\nC) three", {"A": "one", "B": "two", "C": "three"}),
        ("What colour is it?", {}),
        ("Plan A. is fine", {}),
    ],
)
def test_parse_options(question: str, expected: dict[str, str]) -> None:
    assert parse_options(question) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("three", "3"),
        ("Three dogs.", "3 dogs"),
        ("twenty", "20"),
        ("Twenty-one", "21"),
        ("zero", "0"),
        ("none", "0"),
        ("the dog.", "dog"),
        ("An apple", "apple"),
        ("2.5", "2.5"),
        ("It costs 2.5 dollars.", "it costs 2.5 dollars"),
        ("1,000", "1000"),
        ("don't", "do not"),
        ("dont", "do not"),
        ("It's a cello", "it is cello"),
        ("  yes,\n  it   is! ", "yes it is"),
    ],
)
def test_normalize_vqa(text: str, expected: str) -> None:
    assert normalize_vqa(text) == expected


def test_vqa_match() -> None:
    assert vqa_match("three", "3")
    assert vqa_match("The dog.", "dog")
    assert vqa_match("2.5", "2.5")
    assert not vqa_match("2.5", "25")
    assert not vqa_match("3 dogs", "3")
    assert not vqa_match("", "")
    assert not vqa_match("the", "a")


MODELNET_PART = ["bookshelf", "chair", "glass_box", "night_stand", "person", "stairs", "table", "tv_stand"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("night_stand", "night_stand"),
        ("nightstand", "night_stand"),
        ("night stand", "night_stand"),
        ("Night Stand.", "night_stand"),
        ("This point cloud shows a nightstand.", "night_stand"),
        ("chairs", "chair"),
        ("It looks like two chairs", "chair"),
        ("a book shelf", "bookshelf"),
        ("glass boxes", "glass_box"),
        ("people", "person"),
        ("TV stands", "tv_stand"),
        ("stairs", "stairs"),
        ("a stair", "stairs"),
        ("a chair next to a table", None),
        ("a sofa", None),
        ("", None),
    ],
)
def test_match_label(prediction: str, expected: str | None) -> None:
    assert match_label(prediction, MODELNET_PART) == expected


def test_match_label_longest_label_wins() -> None:
    labels = ["stand", "night stand", "lamp"]
    assert match_label("a small night stand", labels) == "night stand"
    assert match_label("a stand", labels) == "stand"
    assert match_label("a lamp on a stand", labels) is None


def test_match_label_similarity_hook_only_when_nothing_matches() -> None:
    calls: list[str] = []

    def similarity(pred: str, labels: list[str]) -> list[float]:
        calls.append(pred)
        return [0.9 if label == "table" else 0.1 for label in labels]

    assert match_label("a chair", MODELNET_PART, similarity) == "chair"
    assert calls == []
    assert match_label("a desk-like thing", MODELNET_PART, similarity) == "table"
    assert calls == ["a desk-like thing"]
    assert match_label("x", ["a", "b"], lambda p, labels: [0.5, 0.5]) is None
    with pytest.raises(ValueError, match="2 scores for 3 labels"):
        match_label("x", ["a", "b", "c"], lambda p, labels: [0.1, 0.2])


def test_match_label_spellings_of_one_class_are_one_label() -> None:
    assert match_label("nightstand", ["night_stand", "nightstand", "chair"]) == "night_stand"
    assert match_label("a night stand", ["night_stand", "nightstand", "chair"]) == "night_stand"


_PIECES = st.sampled_from(
    [*"ABCDEabcdI .,():*\n-'", "answer is ", "Option ", "the ", "three ", "twenty ", "lives in the desert"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=16).map("".join))
def test_parsers_never_invent_values(text: str) -> None:
    assert extract_choice(text, OPTIONS) in {None, *OPTIONS}
    assert normalize_vqa(normalize_vqa(text)) == normalize_vqa(text)
    assert match_label(text, MODELNET_PART) in {None, *MODELNET_PART}
