"""Cheap, dependency-free captioning metrics: BLEU-4 and ROUGE-L on normalised whitespace tokens.

Both metrics compare a candidate caption with one or more reference captions after
:func:`caption_tokens`: lower-case, apostrophes dropped ("dog's" -> "dogs"), every other punctuation
mark or symbol turned into a word break ("well-known" -> "well known"), then split on whitespace. This
is close to, but not the same as, the PTB tokenisation of the COCO caption evaluation, so the numbers are
comparable across runs of this toolkit, not with published COCO scores.

* BLEU (Papineni, Roukos, Ward and Zhu, "BLEU: a method for automatic evaluation of machine translation",
  ACL 2002): modified (clipped) n-gram precisions for n = 1..4, combined by an unweighted geometric mean
  and multiplied by a brevity penalty. :func:`corpus_bleu` is the paper's corpus-level score (counts
  and lengths summed over the corpus before dividing); :func:`sentence_bleu` scores one caption with the
  add-one smoothing of Lin and Och ("ORANGE: a method for evaluating automatic evaluation metrics for
  machine translation", COLING 2004) on the n > 1 precisions, so that one missing 4-gram does not zero it.
* ROUGE-L (Lin, "ROUGE: a package for automatic evaluation of summaries", ACL Workshop 2004): an F-measure
  of the longest common subsequence, with beta = 1.2 and the multi-reference rule of the COCO caption
  evaluation (Chen et al., "Microsoft COCO captions: data collection and evaluation server", 2015).

The tests check both against reference implementations on the same tokens: BLEU equals sacrebleu's
(``tokenize="none"``; sentence BLEU = its ``add-k`` smoothing with k = 1 and ``use_effective_order=False``), and
each reference's LCS precision and recall equal rouge-score's. They are not replaced by those packages because
rouge-score takes the best F-measure over references with beta = 1, not the COCO rule above, and neither
tokenises captions as :func:`caption_tokens` does; runtime needs neither package.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

MAX_N = 4
"""BLEU-4: n-grams of length 1 to 4."""

ROUGE_BETA = 1.2
"""The recall weight of ROUGE-L's F-measure, as in the COCO caption evaluation."""

_APOSTROPHES = re.compile(r"['’‘`]")
_PUNCTUATION = re.compile(r"[^\w\s]|_")


def caption_tokens(text: str) -> list[str]:
    """The tokens every metric here counts: lower-cased words with punctuation removed.

    Apostrophes are deleted (so "it's" -> "its"), any other character that is neither a letter, a digit
    nor whitespace (including ``_``) becomes a space, and the result is split on whitespace:
    ``"A well-known dog's toy."`` -> ``["a", "well", "known", "dogs", "toy"]``.
    """
    return _PUNCTUATION.sub(" ", _APOSTROPHES.sub("", text.lower())).split()


def normalize_caption(text: str) -> str:
    """:func:`caption_tokens` joined by single spaces; idempotent."""
    return " ".join(caption_tokens(text))


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


@dataclass(frozen=True)
class BleuStats:
    """BLEU's sufficient statistics, which add up over a corpus.

    ``matches[n-1]`` is the clipped count of candidate n-grams found in the references, ``totals[n-1]``
    the number of candidate n-grams, ``length`` the candidate's length and ``ref_length`` the length of
    the reference closest to it.
    """

    matches: tuple[int, ...] = (0,) * MAX_N
    totals: tuple[int, ...] = (0,) * MAX_N
    length: int = 0
    ref_length: int = 0

    def __add__(self, other: BleuStats) -> BleuStats:
        return BleuStats(
            tuple(a + b for a, b in zip(self.matches, other.matches, strict=True)),
            tuple(a + b for a, b in zip(self.totals, other.totals, strict=True)),
            self.length + other.length,
            self.ref_length + other.ref_length,
        )


def bleu_stats(candidate: Sequence[str], references: Sequence[Sequence[str]]) -> BleuStats:
    """Clipped n-gram matches and lengths of one tokenised candidate against its tokenised references.

    Clipping (Papineni et al. 2002, section 2.1): each candidate n-gram counts at most as often as it
    occurs in the single reference where it occurs most ("max-overlap"), not in all references together.
    The reference length is the "best match length": the reference length closest to the candidate's,
    the shorter one on a tie (as in the reference ``multi-bleu.perl``).
    """
    if not references:
        raise ValueError("BLEU needs at least one reference")
    matches, totals = [], []
    for n in range(1, MAX_N + 1):
        counts = _ngrams(candidate, n)
        most: Counter[tuple[str, ...]] = Counter()
        for reference in references:
            most |= _ngrams(reference, n)  # | keeps the larger count of each n-gram
        matches.append(sum(min(count, most[gram]) for gram, count in counts.items()))
        totals.append(sum(counts.values()))
    ref_length = min((len(r) for r in references), key=lambda length: (abs(length - len(candidate)), length))
    return BleuStats(tuple(matches), tuple(totals), len(candidate), ref_length)


def bleu_from_stats(stats: BleuStats, *, smooth: bool = False) -> float:
    """BLEU = BP * exp(mean of log p_n), p_n = matches_n / totals_n, BP = min(1, exp(1 - r / c)).

    With ``smooth`` (Lin and Och 2004), p_n = (matches_n + 1) / (totals_n + 1) for n > 1; p_1 is never
    smoothed. Without it, a precision that is zero or undefined (no candidate n-grams) makes BLEU 0, as
    does an empty candidate (c = 0).
    """
    if stats.length == 0:
        return 0.0
    log_sum = 0.0
    for n, (matched, total) in enumerate(zip(stats.matches, stats.totals, strict=True), 1):
        if smooth and n > 1:
            matched, total = matched + 1, total + 1
        if matched == 0 or total == 0:
            return 0.0
        log_sum += math.log(matched / total)
    penalty = 1.0 if stats.length > stats.ref_length else math.exp(1 - stats.ref_length / stats.length)
    return penalty * math.exp(log_sum / len(stats.matches))


def corpus_bleu(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus-level BLEU-4 of ``candidates[i]`` against the captions ``references[i]`` (Papineni et al. 2002).

    Clipped matches, n-gram totals, candidate lengths and closest reference lengths are summed over the
    corpus, and BLEU is computed once from the sums; this is not the mean of per-caption scores. Texts
    are tokenised by :func:`caption_tokens`. An empty corpus scores 0.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    total = BleuStats()
    for candidate, refs in zip(candidates, references, strict=True):
        total += bleu_stats(caption_tokens(candidate), [caption_tokens(r) for r in refs])
    return bleu_from_stats(total)


def sentence_bleu(candidate: str, references: Sequence[str]) -> float:
    """BLEU-4 of one caption, add-one smoothed on n > 1 (Lin and Och 2004), tokenised by :func:`caption_tokens`."""
    return bleu_from_stats(bleu_stats(caption_tokens(candidate), [caption_tokens(r) for r in references]), smooth=True)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (dynamic programming, O(len a * len b))."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, references: Sequence[str], beta: float = ROUGE_BETA) -> float:
    """ROUGE-L F-measure of one caption (Lin 2004), tokenised by :func:`caption_tokens`.

    For each reference, P = LCS / len(candidate) and R = LCS / len(reference). As in the COCO caption
    evaluation, P and R are each maximised over the references separately, then
    F = (1 + beta^2) P R / (R + beta^2 P), and F = 0 when either is 0 (also for an empty candidate).
    """
    if not references:
        raise ValueError("ROUGE-L needs at least one reference")
    tokens = caption_tokens(candidate)
    if not tokens:
        return 0.0
    precision = recall = 0.0
    for reference in references:
        ref_tokens = caption_tokens(reference)
        if not ref_tokens:
            continue
        common = lcs_length(tokens, ref_tokens)
        precision = max(precision, common / len(tokens))
        recall = max(recall, common / len(ref_tokens))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def caption_scores(candidate: str, references: Sequence[str]) -> dict[str, float]:
    """The per-caption scores a prediction record keeps: smoothed sentence ``bleu`` and ``rouge_l``."""
    return {"bleu": sentence_bleu(candidate, references), "rouge_l": rouge_l(candidate, references)}
