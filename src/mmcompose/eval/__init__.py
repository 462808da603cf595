"""Model-independent evaluation: answer parsing, benchmark loading and a resumable, shardable runner.

Everything here but `predict` (which binds a model to the runner) takes a prediction callable, never a
model, so it is tested without weights; `stats` compares two methods item by item.
"""

from mmcompose.data.samples import DEFAULT_MODALITIES, Sample
from mmcompose.eval.answers import (
    extract_choice,
    label_key,
    match_label,
    normalize_vqa,
    parse_options,
    vqa_match,
)
from mmcompose.eval.benchmark import (
    TASK_KINDS,
    gold_answer,
    load_benchmark,
    load_mcub,
    score,
)
from mmcompose.eval.captions import corpus_bleu, rouge_l, sentence_bleu
from mmcompose.eval.runner import merge_shards, run_benchmark, shard_files, summarize

__all__ = [
    "DEFAULT_MODALITIES",
    "TASK_KINDS",
    "Sample",
    "corpus_bleu",
    "extract_choice",
    "gold_answer",
    "label_key",
    "load_benchmark",
    "load_mcub",
    "match_label",
    "merge_shards",
    "normalize_vqa",
    "parse_options",
    "rouge_l",
    "run_benchmark",
    "score",
    "sentence_bleu",
    "shard_files",
    "summarize",
    "vqa_match",
]
