"""Run a prediction callable over a benchmark: resumable, shardable, one JSON line per sample.

Model evaluation is slow and gets killed (pre-emption, OOM, Ctrl-C), so every answer is flushed to disk
as soon as it exists and a rerun only does what is missing. Shards split the work across processes or
machines by sample index, and :func:`merge_shards` reassembles exactly what one unsharded run writes.

A :class:`StagedPredictor` (a model's, :mod:`mmcompose.eval.predict`) splits prediction into preparing a
sample (decoding its media) and answering a batch, so that DataLoader workers decode the next batches while
the model answers this one, and batches are formed from samples of similar length. Both change only the
speed: the records, their order in the file and the metrics are what the serial path writes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import DataLoader, Dataset

from mmcompose.errors import MMComposeError
from mmcompose.eval.answers import Similarity
from mmcompose.eval.benchmark import Sample, check_kind, gold_answer, score, score_caption
from mmcompose.eval.captions import corpus_bleu
from mmcompose.files import atomic_write_text

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
_RECORD_KEYS = ("id", "index", "prediction", "gold", "parsed", "correct", "error")


def shard_files(out_dir: str | Path, shard: tuple[int, int] = (0, 1)) -> tuple[Path, Path]:
    """``(predictions, metrics)`` paths of a shard; the single shard ``(0, 1)`` uses the plain names."""
    index, count = _check_shard(shard)
    out_dir = Path(out_dir)
    if count == 1:
        return out_dir / PREDICTIONS_FILE, out_dir / METRICS_FILE
    suffix = f"shard{index}-of-{count}"
    return out_dir / f"predictions.{suffix}.jsonl", out_dir / f"metrics.{suffix}.json"


def default_num_workers() -> int:
    """DataLoader workers for `mmcompose eval`: one per CPU core this process may use but one (left to the
    model's process), at most 4. An MCUB-4 item takes ~43 ms to decode on one core (PNG, WAV, 8-frame MP4, NPY;
    `benchmarks/preprocess.py`), so 4 workers decode ~90 items/s, more than a 7B model answers on one GPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores - 1))


Predictor = Callable[[Sequence[Sample]], Sequence[str]]
Scorer = Callable[[Sample, str], tuple[str | None, bool]]


@runtime_checkable
class StagedPredictor(Protocol):
    """A predictor in two stages, which the runner overlaps: `prepare(sample)` (decode and process the inputs;
    picklable and without the model, since it runs in DataLoader workers; raises :class:`MMComposeError` for a
    bad input) and `answer(prepared)` for a batch. `sort_keys(samples)` orders samples so that neighbours have
    similar lengths; `evaluating()` wraps the run (e.g. folds the model's text route)."""

    prepare: Callable[[Sample], Any]

    def __call__(self, samples: Sequence[Sample]) -> Sequence[str]: ...

    def answer(self, prepared: Sequence[Any]) -> Sequence[str]: ...

    def sort_keys(self, samples: Sequence[Sample]) -> list[Any]: ...

    def evaluating(self) -> AbstractContextManager[None]: ...


def run_benchmark(
    samples: Sequence[Sample],
    predict: Predictor,
    out_dir: str | Path,
    task: str,
    kind: str,
    *,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    labels: Sequence[str] | None = None,
    similarity: Similarity | None = None,
    batch_size: int = 1,
    scorer: Scorer | None = None,
    num_workers: int = 0,
    prefetch_factor: int = 2,
) -> dict[str, Any]:
    """Predict and score the samples of one shard, append them to its JSONL file, return its metrics.

    ``predict`` answers a batch of up to ``batch_size`` samples at once (models are much faster batched);
    when a batch raises :class:`MMComposeError`, its samples are predicted one by one so that only the
    faulty sample is recorded as failed.

    Pass the whole benchmark to every shard: shard ``(i, n)`` takes the samples whose index ``% n == i``
    and writes ``predictions.shard{i}-of-{n}.jsonl`` and ``metrics.shard{i}-of-{n}.json`` (the plain
    ``predictions.jsonl`` / ``metrics.json`` when ``n == 1``). Ids already in the predictions file are
    skipped, so a killed run resumes where it stopped; a torn last line is discarded. When ``predict``
    raises :class:`MMComposeError` (e.g. an unreadable input), the sample is recorded as failed with the
    error's message and the run goes on; any other exception stops the run. Gold answers are checked for
    every sample before the first prediction, so a bad benchmark fails fast. For ``kind="label"``,
    ``labels`` defaults to the distinct gold answers of ``samples`` (the same for every shard).

    For ``kind="caption"`` a record's ``gold`` is the list of reference captions, ``parsed`` the
    normalised prediction, ``correct`` is ``None`` (a caption is not right or wrong) and ``scores`` holds
    its sentence ``bleu`` and ``rouge_l`` (both 0 for a failed sample).

    ``scorer(sample, prediction) -> (parsed, correct)`` replaces the kind's own parsing and matching (a
    benchmark preset that scores exactly as an official script does, :mod:`mmcompose.eval.presets`).

    With a :class:`StagedPredictor`, ``num_workers`` DataLoader worker processes prepare the samples (0: in
    this process, in turn with answering), each keeping ``prefetch_factor`` batches ready ahead of the model;
    batches are cut from the samples in ``sort_keys`` order and the predictions file is rewritten in sample
    order at the end. A sample whose preparation fails is recorded as failed with its one-line error, as when
    ``predict`` raises for it.
    """
    index, count = _check_shard(shard)
    check_kind(kind)
    if num_workers < 0 or prefetch_factor < 1:
        raise MMComposeError(f"num_workers {num_workers}, prefetch_factor {prefetch_factor}: expected 0 or more "
                             "workers and a prefetch factor of 1 or more")
    positions: dict[str, int] = {}
    for position, sample in enumerate(samples):
        if sample.id in positions:
            raise MMComposeError(f"task {task}: duplicate sample id {sample.id!r}")
        positions[sample.id] = position
    if kind == "label" and labels is None:
        labels = sorted({s.answer for s in samples if s.answer is not None})
    golds = [gold_answer(sample, kind, labels) for sample in samples]
    mine = [p for p in range(len(samples)) if p % count == index]

    predictions_path, metrics_path = shard_files(out_dir, shard)
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    records = _resume(predictions_path, {samples[p].id: p for p in mine})
    done = {record["id"] for record in records}
    todo = [position for position in mine if samples[position].id not in done]
    staged = isinstance(predict, StagedPredictor)
    if staged and batch_size > 1 and len(todo) > 1:
        keys = predict.sort_keys([samples[p] for p in todo])
        todo = [todo[i] for i in sorted(range(len(todo)), key=keys.__getitem__)]
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    evaluating = predict.evaluating() if staged and todo else contextlib.nullcontext()
    # workers start (fork) here, before the progress bar's refresh thread exists
    prepared_batches = _prepared(samples, batches, predict.prepare, num_workers, prefetch_factor) if staged \
        else ((batch, None) for batch in batches)
    with (evaluating, predictions_path.open("a", encoding="utf-8") as out, _progress_bar(progress) as bar):
        bar_task = bar.add_task(task, total=len(mine), completed=len(done))
        for batch, prepared in prepared_batches:
            for record in _predict_batch(samples, batch, golds, predict, kind, labels, similarity, scorer, prepared):
                out.write(_dumps(record) + "\n")
                out.flush()
                records.append(record)
                bar.advance(bar_task)

    written = [record["index"] for record in records]
    records.sort(key=lambda r: r["index"])
    if written != sorted(written):
        atomic_write_text(predictions_path, "".join(_dumps(record) + "\n" for record in records))
    metrics = summarize(records, task, kind)
    if count > 1:
        metrics["shard"] = {"index": index, "count": count, "n_benchmark": len(samples)}
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    return metrics


def merge_shards(out_dir: str | Path, n_shards: int) -> dict[str, Any]:
    """Combine finished shards into ``predictions.jsonl`` and ``metrics.json``; return the metrics.

    A shard counts as finished once its metrics file exists (it is written last); merging refuses
    unfinished shards and shards from different runs, because a partial merge looks like a full result.
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise MMComposeError(f"invalid shard count {n_shards!r}: expected a positive integer")
    out_dir = Path(out_dir)
    if n_shards == 1:
        return _read_metrics(shard_files(out_dir)[1], 0, 1)
    paths = [shard_files(out_dir, (index, n_shards)) for index in range(n_shards)]
    metrics = [_read_metrics(metrics_path, index, n_shards) for index, (_, metrics_path) in enumerate(paths)]
    identities = {(m.get("task"), m.get("kind"), m["shard"].get("n_benchmark")) for m in metrics}
    if len(identities) != 1:
        raise MMComposeError(f"{out_dir}: the shards come from different runs (task, kind, size: {sorted(identities)})")
    ((task, kind, n_benchmark),) = identities
    records: list[dict[str, Any]] = []
    for index, ((predictions_path, metrics_path), shard_metrics) in enumerate(zip(paths, metrics, strict=True)):
        shard_records, _ = _read_records(predictions_path)
        foreign = any(r["index"] % n_shards != index for r in shard_records)
        if foreign or len(shard_records) != shard_metrics.get("n"):
            raise MMComposeError(f"{predictions_path}: does not match {metrics_path.name}; rerun this shard")
        records.extend(shard_records)
    records.sort(key=lambda r: r["index"])
    covered = [r["index"] for r in records] == list(range(n_benchmark))
    if not covered or len({r["id"] for r in records}) != n_benchmark:
        raise MMComposeError(f"{out_dir}: the {n_shards} shards do not cover the {n_benchmark} samples exactly once")
    atomic_write_text(out_dir / PREDICTIONS_FILE, "".join(_dumps(r) + "\n" for r in records))
    merged = summarize(records, task, kind)
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(merged, indent=2) + "\n")
    return merged


def summarize(records: Sequence[dict[str, Any]], task: str, kind: str) -> dict[str, Any]:
    """Accuracy over all records (failed and unparseable ones count as wrong), plus per-category counts.

    For ``caption``: corpus ``bleu4`` and mean ``rouge_l`` instead of accuracy (see :func:`_caption_counts`).
    """
    counts = _caption_counts if kind == "caption" else _counts
    metrics: dict[str, Any] = {"task": task, "kind": kind, **counts(records)}
    if kind != "caption":
        metrics["n_unparseable"] = sum(r["error"] is None and r["parsed"] is None for r in records)
    metrics["n_failed"] = sum(r["error"] is not None for r in records)
    categories = {r.get("category") for r in records}
    if categories != {None}:
        metrics["categories"] = {
            name: counts([r for r in records if (r.get("category") or "(none)") == name])
            for name in sorted(c or "(none)" for c in categories)
        }
    return metrics


def _counts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    n_correct = sum(bool(r["correct"]) for r in records)
    return {
        "n": len(records),
        "n_correct": n_correct,
        "accuracy": n_correct / len(records) if records else None,
    }


def _caption_counts(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Corpus BLEU-4 of the normalised predictions and the mean of the records' ROUGE-L.

    A failed sample is scored as an empty caption: ROUGE-L 0, and in BLEU it adds no n-grams but its
    (shortest) reference length, so it lowers the brevity penalty.
    """
    if not records:
        return {"n": 0, "bleu4": None, "rouge_l": None}
    return {
        "n": len(records),
        "bleu4": corpus_bleu([r["parsed"] or "" for r in records], [r["gold"] for r in records]),
        "rouge_l": sum(r["scores"]["rouge_l"] for r in records) / len(records),
    }


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    valid = (
        isinstance(shard, (tuple, list))
        and len(shard) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in shard)
        and 0 <= shard[0] < shard[1]
    )
    if not valid:
        raise MMComposeError(f"invalid shard {shard!r}: expected (index, count) with 0 <= index < count")
    return shard[0], shard[1]


class _Preparing(Dataset):
    """Item `position` is the prepared sample, or the :class:`MMComposeError` preparing it raised (which crosses
    from a worker process intact, to be recorded as that sample's failure)."""

    def __init__(self, samples: Sequence[Sample], prepare: Callable[[Sample], Any]) -> None:
        self.samples, self.prepare = samples, prepare

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, position: int) -> Any:
        try:
            return self.prepare(self.samples[position])
        except MMComposeError as error:
            return error


def _as_list(items: list[Any]) -> list[Any]:
    return items


def _prepared(samples: Sequence[Sample], batches: list[list[int]], prepare: Callable[[Sample], Any],
              num_workers: int, prefetch_factor: int) -> Iterator[tuple[list[int], list[Any]]]:
    """Each batch of positions with its prepared samples, in order; with workers, prepared ahead of use."""
    if not batches:
        return iter(())
    loader = DataLoader(_Preparing(samples, prepare), batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_as_list, prefetch_factor=prefetch_factor if num_workers else None)
    return zip(batches, loader, strict=True)


def _predict_batch(
    samples: Sequence[Sample],
    positions: list[int],
    golds: list[str | list[str]],
    predict: Predictor,
    kind: str,
    labels: Sequence[str] | None,
    similarity: Similarity | None,
    scorer: Scorer | None = None,
    prepared: list[Any] | None = None,
) -> list[dict[str, Any]]:
    """Records of one batch. `prepared` (a staged predictor's prepared samples, or their errors) is answered with
    `predict.answer`; without it, `predict` is called on the samples themselves."""
    items: list[Any] = [samples[p] for p in positions] if prepared is None else prepared
    call = predict if prepared is None else predict.answer  # type: ignore[attr-defined]
    ready = [i for i, item in enumerate(items) if not isinstance(item, MMComposeError)]
    predictions: list[Any] = list(items)
    if ready:
        try:
            answers: list[str | MMComposeError] = list(call([items[i] for i in ready]))
        except MMComposeError as exc:
            if len(ready) > 1:
                return [record for i, p in enumerate(positions) for record in _predict_batch(
                    samples, [p], golds, predict, kind, labels, similarity, scorer,
                    None if prepared is None else [prepared[i]])]
            answers = [exc]
        if len(answers) != len(ready):
            raise TypeError(f"predict returned {len(answers)} answers for {len(ready)} samples")
        for i, answer in zip(ready, answers, strict=True):
            predictions[i] = answer
    return [_record(samples[p], p, golds[p], prediction, kind, labels, similarity, scorer)
            for p, prediction in zip(positions, predictions, strict=True)]


def _record(
    sample: Sample,
    position: int,
    gold: str | list[str],
    prediction: str | MMComposeError,
    kind: str,
    labels: Sequence[str] | None,
    similarity: Similarity | None,
    scorer: Scorer | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": sample.id,
        "index": position,
        "category": sample.category,
        "prompt": sample.question,
    }
    if isinstance(prediction, MMComposeError):
        message = " ".join(str(prediction).split()) or type(prediction).__name__
        record.update(prediction=None, gold=gold, parsed=None, correct=False, error=message)
        scores = {"bleu": 0.0, "rouge_l": 0.0}
    elif not isinstance(prediction, str):
        raise TypeError(f"predict returned {type(prediction).__name__} for sample {sample.id!r}; expected str")
    elif kind == "caption":
        parsed, scores = score_caption(sample, prediction)
        record.update(prediction=prediction, gold=gold, parsed=parsed, error=None)
    else:
        parsed, correct = (scorer(sample, prediction) if scorer is not None
                           else score(sample, prediction, kind, labels=labels, similarity=similarity))
        record.update(prediction=prediction, gold=gold, parsed=parsed, correct=correct, error=None)
    if kind == "caption":  # a caption is not right or wrong; it has scores instead
        record.update(correct=None, scores=scores)
    return record


def _dumps(record: dict[str, Any]) -> str:
    """One JSONL line; ASCII-only, so the files read the same under any locale's default encoding."""
    return json.dumps(record)


def _read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Parse a predictions file; returns the records and the byte length of its complete lines.

    Each record is written with its newline in one call, so an unterminated last line is the remains of
    a killed write and is ignored; any other bad line means the file was damaged and is an error.
    """
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        lines = data[:complete].decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise MMComposeError(f"{path}: not UTF-8 text ({exc.reason}); delete it to redo these samples") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MMComposeError(f"{path}:{lineno}: damaged record ({exc.msg}); delete the line to redo it") from None
        if not isinstance(record, dict) or any(key not in record for key in _RECORD_KEYS):
            raise MMComposeError(f"{path}:{lineno}: not a prediction record (needs {', '.join(_RECORD_KEYS)})")
        if record["id"] in seen:
            raise MMComposeError(f"{path}:{lineno}: sample id {record['id']!r} is recorded twice")
        seen.add(record["id"])
        records.append(record)
    return records, complete


def _resume(path: Path, expected: dict[str, int]) -> list[dict[str, Any]]:
    """Records already written for this shard, after cutting off a torn last line so appends stay whole."""
    records, complete = _read_records(path)
    for record in records:
        if expected.get(record["id"]) != record["index"]:
            raise MMComposeError(
                f"{path}: sample id {record['id']!r} (index {record['index']}) is not in this "
                "benchmark shard; was the file written for another benchmark?"
            )
    if path.exists() and path.stat().st_size > complete:
        with path.open("r+b") as f:
            f.truncate(complete)
    return records


def _read_metrics(path: Path, index: int, count: int) -> dict[str, Any]:
    if not path.is_file():
        raise MMComposeError(f"{path}: missing, so shard {index} of {count} has not finished; run it first")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MMComposeError(f"{path}: not valid JSON ({exc})") from None
    if count > 1 and (
        not isinstance(metrics, dict)
        or not isinstance(metrics.get("shard"), dict)
        or (metrics["shard"].get("index"), metrics["shard"].get("count")) != (index, count)
    ):
        raise MMComposeError(f"{path}: not the metrics of shard {index} of {count}")
    return metrics


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
