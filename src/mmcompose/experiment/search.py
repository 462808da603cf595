"""DAMC's adaptive parameter adjustment: search the language-delta coefficients lambda.

Coordinate search from uniform 1/M: for each model in turn, try its lambda times each factor (others fixed),
keep a change only if the score strictly improves; repeat for a few rounds. Every trial composes a
checkpoint, scores it and is logged (JSONL), so a search is reproducible and auditable. Two criteria:

* `validation_accuracy` - accuracy on a labelled validation split (MCUB-world val, never the test set);
* `source_agreement` - label-free: how often the composed model answers a single-modality prompt exactly as
  the source model of that modality does.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmcompose.checkpoint import load_checkpoint, read_manifest
from mmcompose.compose.config import CompositionConfig
from mmcompose.compose.engine import compose, model_name
from mmcompose.eval.benchmark import Sample, score
from mmcompose.eval.predict import model_predictor
from mmcompose.model import MultimodalLLM

Criterion = Callable[[MultimodalLLM], float]


@dataclass
class SearchResult:
    lambdas: dict[str, float]
    score: float
    uniform_score: float
    trials: list[dict] = field(default_factory=list)


def validation_accuracy(samples: Sequence[Sample], batch_size: int = 32) -> Criterion:
    def criterion(model: MultimodalLLM) -> float:
        predict = model_predictor(model)
        correct = 0
        for start in range(0, len(samples), batch_size):
            batch = samples[start:start + batch_size]
            for sample, answer in zip(batch, predict(batch), strict=True):
                correct += score(sample, answer, "choice")[1]
        return correct / len(samples)

    return criterion


def source_agreement(prompts: dict[str, Sequence[Sample]], sources: dict[str, MultimodalLLM],
                     batch_size: int = 32) -> Criterion:
    """Label-free: share of single-modality prompts answered exactly as that modality's source model does."""
    reference = {m: _answers(sources[m], prompts[m], batch_size) for m in prompts}

    def criterion(model: MultimodalLLM) -> float:
        rates = []
        for modality, samples in prompts.items():
            answers = _answers(model, samples, batch_size)
            rates.append(sum(a == b for a, b in zip(answers, reference[modality], strict=True)) / len(samples))
        return sum(rates) / len(rates)

    return criterion


def _answers(model: MultimodalLLM, samples: Sequence[Sample], batch_size: int) -> list[str]:
    predict = model_predictor(model)
    return [a for start in range(0, len(samples), batch_size) for a in predict(samples[start:start + batch_size])]


def search_lambdas(config: CompositionConfig, criterion: Criterion, log: Path, *, factors: Sequence[float] = (0.5, 2.0),
                   rounds: int = 2) -> SearchResult:
    """Search the per-model lambdas of a `damc` config; returns the best lambdas and every trial."""
    names = [model_name(entry, read_manifest(entry.path)) for entry in config.models]
    config = config.model_copy(update={"models": [e.model_copy(update={"lambda_": None}) for e in config.models],
                                       "lambdas": {}})
    scores: dict[tuple[float, ...], float] = {}
    trials: list[dict] = []
    log.parent.mkdir(parents=True, exist_ok=True)

    def evaluate(lambdas: tuple[float, ...]) -> float:
        key = tuple(round(value, 6) for value in lambdas)
        if key not in scores:
            trial = config.model_copy(update={"lambdas": dict(zip(names, key, strict=True))})
            with tempfile.TemporaryDirectory() as scratch:
                model = load_checkpoint(compose(trial, Path(scratch) / "trial", progress=False), device="auto").eval()
                scores[key] = criterion(model)
            trials.append({"lambdas": dict(zip(names, key, strict=True)), "score": scores[key]})
            with log.open("a") as handle:
                handle.write(json.dumps(trials[-1]) + "\n")
        return scores[key]

    best = tuple(1.0 / len(names) for _ in names)
    best_score = uniform_score = evaluate(best)
    for _ in range(rounds):
        improved = False
        for index in range(len(names)):
            for factor in factors:
                candidate = tuple(v * factor if i == index else v for i, v in enumerate(best))
                value = evaluate(candidate)
                if value > best_score:
                    best, best_score, improved = candidate, value, True
        if not improved:
            break
    return SearchResult(dict(zip(names, best, strict=True)), best_score, uniform_score, trials)
