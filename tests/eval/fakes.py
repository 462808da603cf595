"""A scripted predictor and a JSONL reader shared by the runner tests."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmcompose.errors import InputError
from mmcompose.eval.benchmark import Sample


class ScriptedModel:
    """Answers each sample from `answers` (None: its input fails with `error`), counts calls per sample, and
    can simulate a kill (KeyboardInterrupt) after `kill_after` predictions."""

    def __init__(self, answers: Mapping[str, str | None], error: str, kill_after: int | None = None) -> None:
        self.answers, self.error, self.kill_after = answers, error, kill_after
        self.calls: Counter[str] = Counter()

    def __call__(self, samples: list[Sample]) -> list[str]:
        return [self.answer(sample) for sample in samples]

    def answer(self, sample: Sample) -> str:
        if self.kill_after is not None and sum(self.calls.values()) == self.kill_after:
            raise KeyboardInterrupt
        self.calls[sample.id] += 1
        answer = self.answers[sample.id]
        if answer is None:
            raise InputError(f"sample {sample.id!r}: {self.error}")
        return answer


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def ask(sample_id: str, question: str, answer: str | None, category: str | None = None,
        references: tuple[str, ...] = ()) -> Sample:
    """A one-question sample with its gold answer (no media)."""
    return Sample(id=sample_id, conversations=[{"from": "human", "value": question}], answer=answer,
                  category=category, references=references)
