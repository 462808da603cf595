"""The paper's benchmarks by name: how the official ModelCompose evaluation finds, parses and scores each one.

`mmcompose eval --benchmark NAME` loads the official file layout and scores as the official scripts do:

* `mcub` (MCUB-4, MCUB-3-<subset>) and `avqa`: the official scorer (`eval_avqa.py`) compares the FIRST
  CHARACTER of the stripped model output with the gold answer, exactly (case-sensitive, no other parsing):
  "A) a dog" scores as A, "The answer is A" as T (wrong). Accuracy is over all predictions. Gold answers
  come from the answer file (`MCUB-answer.json`, `avqa-test_mm_answer.json`), a JSON list in the benchmark
  layout whose last turn holds the letter (a `{id: letter}` object is accepted too).
* `music-avqa`: both the output and the gold (`music-avqa-test_mm_answer.json`) go through the VQA answer
  normalisation (EvalAI's processor: lower case, punctuation, number words, articles, contractions), then
  exact match.
* `modelnet40` (close-set classification): the official script asks GPT to map the free-form description to
  one of the 40 classes; its offline (`--synthetic`) judge, which this preset uses, counts a prediction right
  when it contains the gold class name (case-insensitive). Gold names come from the annotation file
  (`--answers`: a list of `{id, label, label_name}`, `label_name` is the gold) or the questions' gpt turns. The
  GPT judge needs a paid remote model, so numbers can differ from the paper's GPT-judged ones.

Generation is greedy, as the official `--temperature 0`; the official loader allows 128 new tokens. For the
letter benchmarks only the first character counts, and greedy decoding makes it independent of the limit, so
the presets stop at 16 tokens; MUSIC-AVQA and ModelNet40 keep 128.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mmcompose.errors import MMComposeError
from mmcompose.eval.answers import normalize_vqa
from mmcompose.eval.benchmark import Sample, load_benchmark


def first_character(sample: Sample, prediction: str) -> tuple[str | None, bool]:
    """The official MCUB/AVQA judge: `prediction.strip()[:1] == gold`."""
    parsed = prediction.strip()[:1] or None
    return parsed, parsed is not None and parsed == (sample.answer or "").strip()


def vqa_exact(sample: Sample, prediction: str) -> tuple[str | None, bool]:
    """The official MUSIC-AVQA judge: VQA-normalised prediction equals the VQA-normalised gold."""
    parsed = normalize_vqa(prediction.strip()) or None
    return parsed, parsed is not None and parsed == normalize_vqa(sample.answer or "")


def contains_label(sample: Sample, prediction: str) -> tuple[str | None, bool]:
    """The official ModelNet40 offline judge: the gold class name occurs in the output (case-insensitive)."""
    gold = (sample.answer or "").strip()
    found = bool(gold) and gold.lower() in prediction.lower()
    return (gold if found else None), found


@dataclass(frozen=True)
class BenchmarkPreset:
    """One paper benchmark: its official files, the run kind, the judge and the answer length."""

    name: str
    question_files: str  # a regex over file names in the task directory; group "task" names the task
    answer_file: str | None  # looked for beside the questions
    kind: str
    max_new_tokens: int
    scorer: Callable[[Sample, str], tuple[str | None, bool]]


PRESETS = {
    "mcub": BenchmarkPreset("mcub", r"(?P<task>MCUB-(?:4|3-.+))\.json", "MCUB-answer.json", "choice", 16,
                            first_character),
    "avqa": BenchmarkPreset("avqa", r"avqa-test_mm_(?P<task>(?!answer\.json$).+)\.json", "avqa-test_mm_answer.json",
                            "choice", 16, first_character),
    "music-avqa": BenchmarkPreset("music-avqa", r"music-avqa-test_mm_(?P<task>(?!answer\.json$).+)\.json",
                                  "music-avqa-test_mm_answer.json", "open", 128, vqa_exact),
    "modelnet40": BenchmarkPreset("modelnet40", r"(?P<task>(?!.*answer).*modelnet.*)\.json", None, "open", 128,
                                  contains_label),
}


def get_preset(name: str) -> BenchmarkPreset:
    if name not in PRESETS:
        raise MMComposeError(f"unknown --benchmark {name!r} (expected one of {', '.join(PRESETS)})")
    return PRESETS[name]


def load_preset_tasks(preset: BenchmarkPreset, task: Path, data_root: Path | None,
                      answers: Path | None = None) -> dict[str, list[Sample]]:
    """`{task name: samples}` with gold answers attached: `task` is one question file or the directory of the
    official release (every matching question file is a task); the answer file is `answers`, or the
    preset's answer file beside the questions when present (else the questions' own gpt turns)."""
    if task.is_dir():
        pattern = re.compile(preset.question_files)
        files = {m["task"]: f for f in sorted(task.glob("*.json")) if (m := pattern.fullmatch(f.name))}
        if not files:
            raise MMComposeError(f"{task}: no {preset.name} question files (file names matching "
                                 f"{preset.question_files})")
        directory = task
    else:
        if not task.is_file():
            raise MMComposeError(f"{task}: benchmark file not found")
        match = re.fullmatch(preset.question_files, task.name)
        files = {match["task"] if match else task.stem: task}
        directory = task.parent
    answer_file = answers or (directory / preset.answer_file if preset.answer_file else None)
    if answers is not None and not answers.is_file():
        raise MMComposeError(f"{answers}: answer file not found")
    gold = read_answers(answer_file) if answer_file is not None and answer_file.is_file() else None
    root = data_root or directory
    tasks = {}
    for name, file in files.items():
        samples = load_benchmark(file, root)
        if gold is not None:
            samples = [dataclasses.replace(s, answer=gold[s.id]) if s.id in gold else s for s in samples]
        missing = [s.id for s in samples if s.answer is None]
        if missing:
            source = "" if gold is None or answer_file is None else f" and no entry in {answer_file.name}"
            raise MMComposeError(f"{file}: sample id {missing[0]!r} has no gold answer (no gpt turn{source})")
        tasks[name] = samples
    return tasks


def read_answers(path: Path) -> dict[str, str]:
    """Gold answers by sample id from an official answer file: a list of `{id, conversations}` (the last
    turn's value is the answer, as the official scorers read it), a list of ModelNet40 annotations
    `{id, label, label_name}`, or a `{id: answer}` object."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MMComposeError(f"{path}: not valid JSON ({error})") from None
    if isinstance(raw, dict) and all(isinstance(v, str) for v in raw.values()):
        return {str(k): v for k, v in raw.items()}
    if not isinstance(raw, list):
        raise MMComposeError(f"{path}: expected a list of {{id, conversations}} or an {{id: answer}} object")
    gold = {}
    for index, item in enumerate(raw):
        try:
            value = item["label_name"] if "label_name" in item else item["conversations"][-1]["value"]
            gold[str(item["id"])] = str(value)
        except (KeyError, IndexError, TypeError):
            raise MMComposeError(f"{path}: entry {index} has no id or no conversations[-1].value") from None
    return gold


__all__ = ["PRESETS", "BenchmarkPreset", "get_preset", "load_preset_tasks", "read_answers"]
