"""Captioning metrics (BLEU-4, ROUGE-L) checked against hand-computed values and against sacrebleu and rouge-score,
and the `caption` task kind."""

import functools
import json
import logging
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from mmcompose.errors import InputError, MMComposeError
from mmcompose.eval.benchmark import TASK_KINDS, Sample, gold_answer, load_benchmark, score, score_caption
from mmcompose.eval.captions import (
    BleuStats,
    bleu_from_stats,
    bleu_stats,
    caption_tokens,
    corpus_bleu,
    lcs_length,
    normalize_caption,
    rouge_l,
    sentence_bleu,
)
from mmcompose.eval.runner import merge_shards, run_benchmark
from tests.eval.fakes import ScriptedModel, ask, read_lines

DOG = "a small brown dog runs in the park"
DOG_REF = "a small brown dog plays in the park"
CAT = "a cat sits on the mat"


def test_normalisation() -> None:
    assert caption_tokens("A well-known dog's toy.") == ["a", "well", "known", "dogs", "toy"]
    assert caption_tokens("  Two  CATS, (on_a) mat!\n") == ["two", "cats", "on", "a", "mat"]
    assert normalize_caption("It’s a Dog...") == "its a dog"
    assert normalize_caption(normalize_caption("It’s a Dog...")) == "its a dog"
    assert caption_tokens("?!") == []


def test_identical_caption_scores_one() -> None:
    # every n-gram matches: p1..p4 = 6/6, 5/5, 4/4, 3/3 and c = r = 6, so BP = 1
    assert corpus_bleu([CAT], [[CAT]]) == 1.0
    assert sentence_bleu(CAT, [CAT]) == 1.0
    assert rouge_l(CAT, [CAT]) == 1.0
    assert sentence_bleu("A cat sits on the mat!", [CAT]) == 1.0  # normalisation removes the difference


def test_partial_overlap_exact_fractions() -> None:
    # DOG vs DOG_REF differ in one word ("runs"/"plays"), 8 tokens each:
    #   1-grams: 7 of 8 match; 2-grams: a-small small-brown brown-dog in-the the-park = 5 of 7;
    #   3-grams: a-small-brown small-brown-dog in-the-park = 3 of 6; 4-grams: a-small-brown-dog = 1 of 5.
    stats = bleu_stats(caption_tokens(DOG), [caption_tokens(DOG_REF)])
    assert stats == BleuStats((7, 5, 3, 1), (8, 7, 6, 5), 8, 8)
    # BLEU = (7/8 * 5/7 * 3/6 * 1/5) ** (1/4) = (1/16) ** (1/4) = 1/2
    assert corpus_bleu([DOG], [[DOG_REF]]) == pytest.approx(0.5)
    # smoothed: (7/8 * 6/8 * 4/7 * 2/6) ** (1/4) = (1/8) ** (1/4) = 2 ** (-3/4)
    assert sentence_bleu(DOG, [DOG_REF]) == pytest.approx(2 ** (-3 / 4))
    # LCS = 7 (all but runs/plays): P = R = 7/8, and F = P when P = R
    assert rouge_l(DOG, [DOG_REF]) == pytest.approx(7 / 8)


def test_smoothing_rescues_a_missing_4gram() -> None:
    # "the cat sat on the mat" vs "the cat is on the mat": matches 5/6, 3/5, 1/4 (on-the-mat), 0/3
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    assert bleu_stats(caption_tokens(hyp), [caption_tokens(ref)]) == BleuStats((5, 3, 1, 0), (6, 5, 4, 3), 6, 6)
    assert corpus_bleu([hyp], [[ref]]) == 0.0  # unsmoothed: p4 = 0
    # add-one on n > 1 only: (5/6 * 4/6 * 2/5 * 1/4) ** (1/4) = (1/18) ** (1/4)
    assert sentence_bleu(hyp, [ref]) == pytest.approx((1 / 18) ** 0.25)
    # no unigram match: p1 is not smoothed, so the score stays 0
    assert sentence_bleu("zebra", [ref]) == 0.0
    # LCS "the cat on the mat" = 5: P = R = 5/6
    assert rouge_l(hyp, [ref]) == pytest.approx(5 / 6)


def test_brevity_penalty() -> None:
    # "a small brown dog" is a perfect prefix of the 8-token reference: all precisions 1, c = 4, r = 8
    short = "a small brown dog"
    assert corpus_bleu([short], [[DOG_REF]]) == pytest.approx(math.exp(1 - 8 / 4))
    assert sentence_bleu(short, [DOG_REF]) == pytest.approx(math.exp(-1))
    # ROUGE-L: LCS 4, P = 1, R = 1/2: F = 2.44 * 1 * 0.5 / (0.5 + 1.44 * 1) = 1.22 / 1.94 = 61/97
    assert rouge_l(short, [DOG_REF]) == pytest.approx(61 / 97)
    # the closest reference length counts: refs of 3 and 6 tokens, c = 4 -> r = 3 < c, no penalty
    assert bleu_stats(caption_tokens(short), [["x"] * 3, ["x"] * 6]).ref_length == 3
    assert corpus_bleu([short], [[DOG_REF, "a small brown"]]) == 1.0
    # a tie (refs of 3 and 5 tokens, c = 4) takes the shorter one
    assert bleu_stats(caption_tokens(short), [["x"] * 5, ["x"] * 3]).ref_length == 3
    # longer than the reference: no penalty, only lower precision
    assert bleu_from_stats(BleuStats((10, 9, 8, 7), (10, 9, 8, 7), 10, 6)) == 1.0


def test_multiple_references_clip_by_the_best_single_reference() -> None:
    hyp, refs = "the the the cat", ["the cat", "the the mat"]
    # 1-grams: "the" x3 is clipped to max(1, 2) = 2 (not 1 + 2 = 3), "cat" to 1 -> 3 of 4;
    # 2-grams: the-the x2 clipped to max(0, 1) = 1, the-cat to max(1, 0) = 1 -> 2 of 3; 3-, 4-grams: 0 of 2, 0 of 1.
    # lengths 2 and 3, c = 4: the closest is 3.
    stats = bleu_stats(caption_tokens(hyp), [caption_tokens(r) for r in refs])
    assert stats == BleuStats((3, 2, 0, 0), (4, 3, 2, 1), 4, 3)
    # smoothed: (3/4 * 3/4 * 1/3 * 1/2) ** (1/4) = (3/32) ** (1/4); BP = 1 since c > r
    assert sentence_bleu(hyp, refs) == pytest.approx((3 / 32) ** 0.25)
    # ROUGE-L: LCS 2 with each ("the cat"; "the the"): P = 2/4 for both, R = max(2/2, 2/3) = 1:
    # F = 2.44 * 0.5 * 1 / (1 + 1.44 * 0.5) = 1.22 / 1.72 = 61/86
    assert rouge_l(hyp, refs) == pytest.approx(61 / 86)


def test_rouge_l_maximises_precision_and_recall_separately() -> None:
    # COCO's rule: "dog" gives R = 1/1 (P = 1/5); the long ref gives LCS "a big runs" = 3, P = 3/5 (R = 3/7).
    # F = 2.44 * (3/5) * 1 / (1 + 1.44 * 3/5) = 1.464 / 1.864 = 183/233
    assert rouge_l("a big dog runs fast", ["dog", "a big cat runs slowly today now"]) == pytest.approx(183 / 233)
    assert rouge_l("", [CAT]) == 0.0
    assert rouge_l("zebra", [CAT]) == 0.0


def test_lcs_length() -> None:
    assert lcs_length([], ["a"]) == 0
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4  # the textbook example (e.g. "bcba")
    assert lcs_length(list("bdcaba"), list("abcbdab")) == 4


def test_corpus_bleu_sums_counts_instead_of_averaging() -> None:
    # DOG: matches (7, 5, 3, 1) of (8, 7, 6, 5); CAT identical: (6, 5, 4, 3) of (6, 5, 4, 3); c = r = 14.
    # p = 13/14, 10/12, 7/10, 4/8: BLEU = (13*10*7*4 / (14*12*10*8)) ** (1/4) = (13/48) ** (1/4) ~ 0.721,
    # not the mean (0.5 + 1) / 2 of the two sentence scores
    assert corpus_bleu([DOG, CAT], [[DOG_REF], [CAT]]) == pytest.approx((13 / 48) ** 0.25)
    # an empty candidate adds no n-grams but its reference length: c = 6, r = 6 + 8, BP = exp(1 - 14/6)
    assert corpus_bleu([CAT, ""], [[CAT], [DOG_REF]]) == pytest.approx(math.exp(1 - 14 / 6))
    assert corpus_bleu([], []) == 0.0
    assert corpus_bleu(["", ""], [[CAT], [DOG]]) == 0.0
    with pytest.raises(ValueError, match="2 candidates but 1 reference sets"):
        corpus_bleu([CAT, CAT], [[CAT]])
    with pytest.raises(ValueError, match="at least one reference"):
        sentence_bleu(CAT, [])


# --- the `caption` task kind -----------------------------------------------------------------------------------


def caption_item(sample_id: str, gpt: str | None, references: Any = None, category: str = "pets") -> dict[str, Any]:
    conversations = [{"from": "human", "value": "<image>\nDescribe the image."}]
    if gpt is not None:
        conversations.append({"from": "gpt", "value": gpt})
    item: dict[str, Any] = {
        "id": sample_id,
        "conversations": conversations,
        "modal_inputs": {"image": [f"img/{sample_id}.png"]},
        "category": category,
    }
    if references is not None:
        item["meta"] = {"task": "caption", "references": references}
    return item


def load_captions(tmp_path: Path) -> list[Sample]:
    items = [
        caption_item("c0", "A small brown dog plays in the park."),
        caption_item("c1", "A cat sits on the mat.", [" A cat sits on the mat.", "A cat is sitting on a mat."]),
        caption_item("c2", "A red ball.", category="toys"),
    ]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(items), encoding="utf-8")
    return load_benchmark(path)


# id -> what the fake model says; None = it raises InputError
ANSWERS: dict[str, str | None] = {
    "c0": "A small brown dog runs in the park",
    "c1": "a cat sits on the mat!",
    "c2": None,
}

# c0: matches (7, 5, 3, 1) of (8, 7, 6, 5), c = r = 8; ROUGE-L 7/8, sentence BLEU 2 ** (-3/4).
# c1: identical to its first reference: (6, 5, 4, 3) of (6, 5, 4, 3), r = 6 (refs of 6 and 7 tokens); 1 and 1.
# c2: failed -> empty caption: no n-grams, c = 0, r = 3 ("a red ball"); 0 and 0.
# corpus: p = 13/14, 10/12, 7/10, 4/8 -> (13/48) ** (1/4); c = 14, r = 17 -> BP = exp(1 - 17/14)
EXPECTED = {
    "task": "CAPS",
    "kind": "caption",
    "n": 3,
    "bleu4": (13 / 48) ** 0.25 * math.exp(1 - 17 / 14),
    "rouge_l": (7 / 8 + 1 + 0) / 3,
    "n_failed": 1,
}
EXPECTED_CATEGORIES = {
    "pets": {"n": 2, "bleu4": (13 / 48) ** 0.25, "rouge_l": (7 / 8 + 1) / 2},  # c = r = 14 here
    "toys": {"n": 1, "bleu4": 0.0, "rouge_l": 0.0},
}


def check_metrics(metrics: dict[str, Any]) -> None:
    metrics = dict(metrics)
    categories = metrics.pop("categories")
    assert metrics == pytest.approx(EXPECTED)
    assert categories.keys() == EXPECTED_CATEGORIES.keys()
    for name, expected in EXPECTED_CATEGORIES.items():
        assert categories[name] == pytest.approx(expected)


FakeCaptioner = functools.partial(ScriptedModel, ANSWERS, "image not decodable")


def test_samples_carry_meta_references(tmp_path: Path) -> None:
    c0, c1, c2 = load_captions(tmp_path)
    assert "caption" in TASK_KINDS
    assert c0.references == ()
    assert c1.references == ("A cat sits on the mat.", "A cat is sitting on a mat.")
    # the gpt turn first, then meta.references, exact duplicates dropped
    assert gold_answer(c1, "caption") == ["A cat sits on the mat.", "A cat is sitting on a mat."]
    assert gold_answer(c2, "caption") == ["A red ball."]
    only_meta = ask("m", "Describe.", None, references=("A dog.",))
    assert gold_answer(only_meta, "caption") == ["A dog."]
    perfect = {"bleu": 1.0, "rouge_l": 1.0}
    assert score_caption(c1, "A cat is sitting on a mat") == ("a cat is sitting on a mat", perfect)
    with pytest.raises(ValueError, match="scored by score_caption"):
        score(c1, "a cat", "caption")


def test_caption_gold_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"sample 'n': no gold answer \(no gpt turn and no meta.references\)"):
        gold_answer(ask("n", "Describe.", None), "caption")
    with pytest.raises(InputError, match=r"sample 'e': reference caption '\.\.\.' is empty after normalisation"):
        gold_answer(ask("e", "Describe.", "A dog.", references=("...",)), "caption")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([caption_item("b", "A dog.", "A dog.")]), encoding="utf-8")
    with pytest.raises(MMComposeError, match=r"sample #0 \(id 'b'\): meta.references: Input should be a valid list"):
        load_benchmark(path)
    # other meta keys stay free-form; a non-object meta is ignored as before
    item = caption_item("ok", "A dog.")
    item["meta"] = ["anything"]
    path.write_text(json.dumps([item]), encoding="utf-8")
    assert load_benchmark(path)[0].references == ()


def test_runner_writes_caption_scores_and_corpus_metrics(tmp_path: Path) -> None:
    model = FakeCaptioner()
    metrics = run_benchmark(load_captions(tmp_path), model, tmp_path / "out", "CAPS", "caption", progress=False)
    check_metrics(metrics)
    check_metrics(json.loads((tmp_path / "out" / "metrics.json").read_text()))
    c0, c1, c2 = read_lines(tmp_path / "out" / "predictions.jsonl")
    assert c0["gold"] == ["A small brown dog plays in the park."]
    assert c0["parsed"] == "a small brown dog runs in the park"
    assert c0["correct"] is None and c0["error"] is None
    assert c0["scores"] == pytest.approx({"bleu": 2 ** (-3 / 4), "rouge_l": 7 / 8})
    assert c1["gold"] == ["A cat sits on the mat.", "A cat is sitting on a mat."]
    assert c1["scores"] == {"bleu": 1.0, "rouge_l": 1.0}
    # the failed sample: zero scores, no prediction, and it counts in the means above
    assert c2 == {
        "id": "c2",
        "index": 2,
        "category": "toys",
        "prompt": "<image>\nDescribe the image.",
        "prediction": None,
        "gold": ["A red ball."],
        "parsed": None,
        "correct": None,
        "error": "sample 'c2': image not decodable",
        "scores": {"bleu": 0.0, "rouge_l": 0.0},
    }
    assert model.calls == Counter({"c0": 1, "c1": 1, "c2": 1})


def test_caption_run_resumes_and_merges(tmp_path: Path) -> None:
    samples = load_captions(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(samples, FakeCaptioner(kill_after=1), tmp_path / "out", "CAPS", "caption", progress=False)
    assert [r["id"] for r in read_lines(tmp_path / "out" / "predictions.jsonl")] == ["c0"]
    resumed = FakeCaptioner()
    check_metrics(run_benchmark(samples, resumed, tmp_path / "out", "CAPS", "caption", progress=False))
    assert resumed.calls == Counter({"c1": 1, "c2": 1})
    again = FakeCaptioner()
    check_metrics(run_benchmark(samples, again, tmp_path / "out", "CAPS", "caption", progress=False, batch_size=3))
    assert again.calls == Counter()

    for i in range(2):
        run_benchmark(samples, FakeCaptioner(), tmp_path / "sharded", "CAPS", "caption", shard=(i, 2), progress=False)
    check_metrics(merge_shards(tmp_path / "sharded", 2))
    merged = (tmp_path / "sharded" / "predictions.jsonl").read_bytes()
    assert merged == (tmp_path / "out" / "predictions.jsonl").read_bytes()


def test_all_failed_and_empty_caption_runs(tmp_path: Path) -> None:
    samples = load_captions(tmp_path)

    def broken(batch: list[Sample]) -> list[str]:
        raise InputError("no decoder")

    metrics = run_benchmark(samples, broken, tmp_path / "failed", "CAPS", "caption", progress=False)
    assert {k: metrics[k] for k in ("n", "n_failed", "bleu4", "rouge_l")} == {
        "n": 3,
        "n_failed": 3,
        "bleu4": 0.0,
        "rouge_l": 0.0,
    }
    metrics = run_benchmark(samples[:1], broken, tmp_path / "empty", "CAPS", "caption", shard=(1, 2), progress=False)
    assert metrics["n"] == 0 and metrics["bleu4"] is None and metrics["rouge_l"] is None


def _random_captions(seed: int, count: int) -> tuple[list[str], list[list[str]]]:
    """Captions of 1..12 words from a 14-word vocabulary, each with three references that are copies of it with
    about a third of the words replaced, dropped or doubled (so that n-grams of every order match, but not all)."""
    rng = random.Random(seed)
    words = ["a", "the", "cat", "dog", "sits", "runs", "on", "in", "park", "mat", "small", "brown", "red", "big"]

    def edit(caption: list[str]) -> str:
        out: list[str] = []
        for word in caption:
            roll = rng.random()
            out += [] if roll < 0.1 else [rng.choice(words)] if roll < 0.25 else [word, word] if roll < 0.3 else [word]
        return " ".join(out or [rng.choice(words)])

    candidates = [[rng.choice(words) for _ in range(rng.randint(1, 12))] for _ in range(count)]
    return [" ".join(c) for c in candidates], [[edit(c) for _ in range(3)] for c in candidates]


def test_bleu_equals_sacrebleu() -> None:
    # On text that caption_tokens leaves as it is, with sacrebleu's own tokenisation off: corpus BLEU without
    # smoothing, and sentence BLEU with add-one on n > 1 (sacrebleu's add-k, k = 1, all four orders).
    logging.getLogger("sacrebleu").setLevel(logging.ERROR)  # it recommends effective order for sentence BLEU
    candidates, references = _random_captions(0, 300)
    theirs = sacrebleu.corpus_bleu(candidates, [list(stream) for stream in zip(*references, strict=True)],
                                   tokenize="none", smooth_method="none", force=True)
    assert corpus_bleu(candidates, references) * 100 == pytest.approx(theirs.score, rel=1e-12)
    assert 5 < theirs.score < 95  # neither trivial case
    for candidate, refs in zip(candidates, references, strict=True):
        theirs = sacrebleu.sentence_bleu(candidate, refs, tokenize="none", smooth_method="add-k", smooth_value=1,
                                         use_effective_order=False)
        assert sentence_bleu(candidate, refs) * 100 == pytest.approx(theirs.score, rel=1e-12, abs=1e-12)


def test_rouge_l_equals_rouge_score() -> None:
    # rouge-score gives each reference's LCS precision and recall; ours takes the best of each over the references
    # (the COCO caption evaluation's rule) and weighs recall by beta = 1.2. With one reference and beta = 1 the two
    # are one F-measure.
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    candidates, references = _random_captions(1, 300)
    for candidate, refs in zip(candidates, references, strict=True):
        scores = [scorer.score(reference, candidate)["rougeL"] for reference in refs]
        assert rouge_l(candidate, refs[:1], beta=1.0) == pytest.approx(scores[0].fmeasure, rel=1e-12)
        precision, recall = max(s.precision for s in scores), max(s.recall for s in scores)
        expected = 0.0 if precision * recall == 0 else 2.44 * precision * recall / (recall + 1.44 * precision)
        assert rouge_l(candidate, refs) == pytest.approx(expected, rel=1e-12)
