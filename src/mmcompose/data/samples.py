"""One sample schema and one loader for evaluation and training data, in the three layouts people have.

Layouts, detected per file from its records (:func:`detect_layout`):

* ``modal_inputs`` (ours, and the official ModelCompose release): ``{id, conversations: [{from, value}],
  modal_inputs: {modality: [path]}}``. The official files key images ``vision`` (their placeholder is still
  ``<image>``); that key is read as ``image``. Optional ``category`` and ``meta`` (``meta.references``: more
  reference captions).
* ``llava``: ``{id, conversations, image: path}`` (no ``modal_inputs``), ``<image>`` in the first human turn;
  samples without ``image`` are text-only.

The whole file is validated before anything uses it, without decoding media: each record's shape, that
its media exist under ``data_root``, that its modalities are among those allowed (the model's), that every
placeholder has one medium and every medium one placeholder. Each bad record is one line naming the file,
the record's index and the field (:class:`BadSample`); ``on_bad_sample="stop"`` raises on the first file
with bad records (all of its lines in the message's tail), ``"skip"`` drops them and reports them.

Files are read record by record (:func:`iter_records`). :func:`load_files` keeps every :class:`Sample` (small
evaluation files); :func:`stream_samples` (training) keeps only where each valid record is in its file
(:class:`StoredSamples`), so a 50k-record file costs ~2 MB instead of ~150 MB of parsed and validated records.
"""

from __future__ import annotations

import codecs
import json
import re
from array import array
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from mmcompose.errors import InputError

Layout = Literal["modal_inputs", "llava"]
OnBadSample = Literal["stop", "skip"]
Purpose = Literal["eval", "train"]

DEFAULT_MODALITIES = ("image", "audio", "video", "point")
"""Modalities whose ``<name>`` placeholder is always counted, even when a sample has no such input."""

MODALITY_ALIASES = {"vision": "image"}
"""Keys of the official release's ``modal_inputs`` that name one of our modalities differently."""


@pydantic_dataclass(frozen=True, slots=True)
class Sample:
    """One validated sample: what evaluation scores and training learns from.

    ``conversations`` are the turns verbatim (placeholders included: the model needs them to place its
    inputs). ``modal_inputs`` paths are joined to the loader's ``data_root`` when it was given one, otherwise
    as written. ``answer`` is the final gpt turn (stripped), or for MCUB the letter of its answer file;
    ``references`` are extra gold captions from ``meta.references``; ``origin`` is (file, index) of the
    record, for messages about the sample after loading. A slotted (pydantic) dataclass rather
    than a model: a training file holds every sample's text in memory, and slots take ~500 bytes less per
    sample (88 -> 64 MB for 50k two-turn samples, measured with tracemalloc).
    """

    id: str
    conversations: list[dict[str, str]]
    modal_inputs: dict[str, list[Path]] = field(default_factory=dict)
    answer: str | None = None
    category: str | None = None
    references: tuple[str, ...] = ()
    origin: tuple[str, int] | None = field(default=None, compare=False, repr=False)

    @property
    def question(self) -> str:
        """The first human turn."""
        return self.conversations[0]["value"]


@dataclass(frozen=True)
class BadSample:
    """Why one record of a data file was rejected: the file, its index, the field and what is wrong."""

    file: str
    index: int
    field: str
    message: str
    id: str | None = None

    def __str__(self) -> str:
        name = f" (id {self.id!r})" if self.id is not None else ""
        where = f": {self.field}" if self.field else ""
        return f"{self.file}: sample #{self.index}{name}{where}: {self.message}"


@dataclass
class SampleSet:
    """The valid samples of one or more files, in file order, and the records that were skipped."""

    samples: Sequence[Sample] = field(default_factory=list)  # a list, or a StoredSamples when streamed
    skipped: list[BadSample] = field(default_factory=list)

    def extend(self, other: SampleSet) -> None:
        self.samples = [*self.samples, *other.samples]
        self.skipped += other.skipped


class _Turn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    speaker: Literal["human", "gpt"] = Field(alias="from")
    value: StrictStr


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow")
    references: list[StrictStr] = Field(default_factory=list)


class _Record(BaseModel):
    """A record of the ``modal_inputs`` layout (extra keys are kept by the file, ignored here)."""

    model_config = ConfigDict(extra="ignore")
    id: StrictStr | StrictInt
    conversations: list[_Turn]
    modal_inputs: dict[str, list[StrictStr]]
    category: StrictStr | None = None
    meta: Any = None  # free-form; only an object's `references` is read


class _LlavaRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr | StrictInt
    conversations: list[_Turn]
    image: StrictStr | list[StrictStr] | None = None


def detect_layout(records: Sequence[Any]) -> Layout:
    """``llava`` when no record has ``modal_inputs`` and some record has ``image``; else ``modal_inputs``."""
    objects = [r for r in records if isinstance(r, dict)]
    if not any("modal_inputs" in r for r in objects) and any("image" in r for r in objects):
        return "llava"
    return "modal_inputs"


def read_records(path: str | Path) -> list[Any]:
    """The records of a data file: a JSON list, or JSON Lines (``.jsonl``: one record per line)."""
    return [record for record, _, _ in iter_records(path)]


STREAM_CHUNK = 1 << 20
"""Bytes read at a time when a data file is streamed record by record."""


def iter_records(path: str | Path) -> Iterator[tuple[Any, int, int]]:
    """Each record of a data file with its byte offset and size in the file, read record by record.

    A JSON list is decoded item by item (``json.JSONDecoder.raw_decode`` over 1 MiB reads), JSON Lines line by
    line, so memory holds one read and one record, not the file: a 50k-record list is ~90 MB as one parsed
    object; :class:`StoredSamples` parses a record again from its offset and size. On any file-level problem (not
    UTF-8, not JSON, not a list, no records) the file is read whole once more, so the error is exactly the
    one ``json.loads`` of the whole file gives; a file that is bad anyway costs its size in memory.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    except OSError as error:
        raise InputError(f"{path}: not a readable text file ({error})") from None
    count = 0
    with handle:
        try:
            items = _jsonl_items(handle) if path.suffix == ".jsonl" else _json_list_items(handle)
            for item in items:
                count += 1
                yield item
        except (_NotAList, json.JSONDecodeError, UnicodeDecodeError, OSError):
            _read_whole(path)  # raises the whole-file error
            raise InputError(f"{path}: not valid JSON") from None  # only if the whole file reads fine
    if not count:
        raise InputError(f"{path}: contains no samples")


_SPACE = re.compile(r"[ \t\n\r]*")


class _NotAList(ValueError):
    """The streamed JSON file is not a plain list (its exact error comes from reading it whole)."""


def _jsonl_items(handle: BinaryIO) -> Iterator[tuple[Any, int, int]]:
    offset = 0
    for line in handle:
        if line.strip():
            yield json.loads(line), offset, len(line)
        offset += len(line)


def _json_list_items(handle: BinaryIO) -> Iterator[tuple[Any, int, int]]:
    """The items of a JSON list (see :func:`iter_records`). `text[pos:]` is the undecoded rest of what was read;
    `at` is the byte offset of `text[pos]` (outside items JSON allows only ASCII whitespace and commas, so
    there one character is one byte)."""
    decoder = json.JSONDecoder()
    incremental = codecs.getincrementaldecoder("utf-8")()
    text, pos, at, done = "", 0, 0, False

    def more() -> bool:
        nonlocal text, pos, done
        if done:
            return False
        chunk = handle.read(STREAM_CHUNK)
        done = not chunk
        text = text[pos:] + incremental.decode(chunk, final=done)
        pos = 0
        return True

    def skip_space() -> str:
        """The next character after whitespace ('' at the end of the file)."""
        nonlocal pos, at
        while True:
            stripped = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
            at += stripped - pos
            pos = stripped
            if pos < len(text) or not more():
                return text[pos:pos + 1]

    if skip_space() != "[":
        raise _NotAList
    pos, at = pos + 1, at + 1
    if skip_space() == "]":
        pos, at = pos + 1, at + 1
    else:
        while True:
            skip_space()
            while True:
                try:
                    record, end = decoder.raw_decode(text, pos)
                except json.JSONDecodeError:
                    if more():
                        continue  # the item runs past what was read
                    raise
                if end < len(text) or not more():  # a number at the end of a read may continue
                    break
            item = text[pos:end]
            size = len(item) if item.isascii() else len(item.encode("utf-8"))
            yield record, at, size
            pos, at = end, at + size
            after = skip_space()
            pos, at = pos + 1, at + 1
            if after == "]":
                break
            if after != ",":
                raise _NotAList
    if skip_space() != "":
        raise _NotAList


def _read_whole(path: Path) -> list[Any]:
    """A data file parsed whole: the reference for the file-level errors of :func:`iter_records`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: data file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable text file ({error})") from None
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    if not records:
        raise InputError(f"{path}: contains no samples")
    return records


def load_samples(path: str | Path, data_root: str | Path | None = None, *, purpose: Purpose = "eval",
                 modalities: Collection[str] | None = None, placeholders: Mapping[str, str] | None = None,
                 on_bad_sample: OnBadSample = "stop") -> SampleSet:
    """Read and validate one data file of either layout (see :func:`validate_records`)."""
    return validate_records(read_records(path), str(path), data_root, purpose=purpose, modalities=modalities,
                            placeholders=placeholders, on_bad_sample=on_bad_sample)


def load_files(paths: Iterable[str | Path], data_root: str | Path | None = None, **options: Any) -> SampleSet:
    """:func:`load_samples` over several files: every file is validated before the result is returned."""
    result = SampleSet()
    for path in paths:
        result.extend(load_samples(path, data_root, **options))
    return result


def validate_records(records: Sequence[Any], source: str, data_root: str | Path | None = None, *,
                     purpose: Purpose = "eval", modalities: Collection[str] | None = None,
                     placeholders: Mapping[str, str] | None = None,
                     on_bad_sample: OnBadSample = "stop") -> SampleSet:
    """Validate every record of `source` (a file name, for messages) without decoding media.

    ``purpose="eval"``: one human turn and an optional gpt turn (the gold answer); ids must be unique.
    ``purpose="train"``: turns alternate human, gpt, ... and end with the gpt turn to learn.
    ``modalities``: the allowed ones (a model's); others make the record bad. ``placeholders``: modality ->
    placeholder string (default ``<modality>``); the placeholders of :data:`DEFAULT_MODALITIES` and of
    ``modalities`` are always counted. With ``data_root`` media paths are joined to it and must be files.
    With ``on_bad_sample="stop"`` any bad record raises :class:`InputError` listing every bad record;
    with ``"skip"`` they are left out and returned in :attr:`SampleSet.skipped`.
    """
    checker = _Checker(data_root, purpose, modalities, placeholders, on_bad_sample)
    if not records:
        raise InputError(f"{source}: contains no samples")
    layout = detect_layout(records)
    result = SampleSet()
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        sample = checker.unique(checker.check(record, layout, source, index), seen)
        if isinstance(sample, BadSample):
            result.skipped.append(sample)
        else:
            result.samples.append(sample)  # type: ignore[attr-defined]
    checker.finish(source, len(result.samples), result.skipped)
    return result


def stream_samples(paths: Iterable[str | Path], data_root: str | Path | None = None, *, purpose: Purpose = "eval",
                   modalities: Collection[str] | None = None, placeholders: Mapping[str, str] | None = None,
                   on_bad_sample: OnBadSample = "stop") -> SampleSet:
    """:func:`load_files`, with memory independent of the number of samples: its ``samples`` are a
    :class:`StoredSamples`, which keeps where each valid record is and parses it again when indexed.

    Each file is read twice record by record (:func:`iter_records`): once for its layout, once to validate
    each record exactly as :func:`validate_records` does (same samples, order and messages).
    """
    checker = _Checker(data_root, purpose, modalities, placeholders, on_bad_sample)
    stored = StoredSamples(checker)
    skipped: list[BadSample] = []
    for path in paths:
        source, before, bad = str(path), len(stored), len(skipped)
        layout = _stream_layout(path)
        seen: dict[str, int] = {}
        for index, (record, offset, size) in enumerate(iter_records(path)):
            sample = checker.unique(checker.check(record, layout, source, index), seen)
            if isinstance(sample, BadSample):
                skipped.append(sample)
            else:
                stored.add(path, layout, index, offset, size, sample)
        checker.finish(source, len(stored) - before, skipped[bad:])
    return SampleSet(samples=stored.frozen(), skipped=skipped)  # type: ignore[arg-type]


def _stream_layout(path: str | Path) -> Layout:
    """:func:`detect_layout` of a file, streamed: only whether any record has ``modal_inputs`` or ``image``."""
    inputs = image = False
    for record, _, _ in iter_records(path):
        if isinstance(record, dict):
            inputs, image = inputs or "modal_inputs" in record, image or "image" in record
    return detect_layout([{"image": None}] if image and not inputs else [])


class _Checker:
    """The validation options of one load, shared by the eager and the streamed loader."""

    def __init__(self, data_root: str | Path | None, purpose: Purpose, modalities: Collection[str] | None,
                 placeholders: Mapping[str, str] | None, on_bad_sample: OnBadSample) -> None:
        if on_bad_sample not in ("stop", "skip"):
            raise InputError(f"on_bad_sample {on_bad_sample!r}: expected stop or skip")
        self.root = Path(data_root) if data_root is not None else None
        self.purpose, self.modalities, self.on_bad_sample = purpose, modalities, on_bad_sample
        self.marks = dict(placeholders or {})
        self.counted = list(dict.fromkeys((*DEFAULT_MODALITIES, *(modalities or ()))))

    def check(self, record: Any, layout: Layout, source: str, index: int) -> Sample | BadSample:
        return _validate(record, layout, source, index, self.root, self.purpose, self.modalities, self.marks,
                         self.counted)

    def unique(self, sample: Sample | BadSample, seen: dict[str, int]) -> Sample | BadSample:
        """For evaluation, a sample whose id an earlier one of its file has is bad."""
        if isinstance(sample, Sample) and self.purpose == "eval":
            source, index = sample.origin  # type: ignore[misc]
            if sample.id in seen:
                return BadSample(source, index, "id", f"duplicate id {sample.id!r} (first used by sample "
                                                      f"#{seen[sample.id]})", sample.id)
            seen[sample.id] = index
        return sample

    def finish(self, source: str, valid: int, skipped: Sequence[BadSample]) -> None:
        """Raise for a file with bad records under ``stop``, or with no valid record."""
        if skipped and self.on_bad_sample == "stop":
            first, rest = str(skipped[0]), len(skipped) - 1
            more = f" (and {rest} more bad sample(s): {'; '.join(map(str, skipped[1:4]))}" \
                   f"{'; ...' if rest > 3 else ''})" if rest else ""
            raise InputError(first + more)
        if not valid:
            raise InputError(f"{source}: no valid samples ({len(skipped)} skipped)")


class StoredSamples(Sequence[Sample]):
    """Validated samples that stay in their files: per sample only its file, record index, byte offset and
    size, and its number of inputs per modality (numpy arrays, ~40 bytes a sample). Item `i` parses and
    validates its record again (in DataLoader workers when they fetch it), giving the `Sample` the eager loader
    gives; a record changed since loading is an :class:`InputError` naming it."""

    def __init__(self, checker: _Checker) -> None:
        self._checker = checker
        self.files: list[tuple[str, Layout]] = []  # (source as given, layout)
        self._columns: dict[str, array[int]] = {k: array("q") for k in ("file", "index", "offset", "size")}
        self._counts: dict[str, array[int]] = {}
        self.arrays: dict[str, np.ndarray] = {}  # file, index, offset, size
        self.counts: dict[str, np.ndarray] = {}

    def add(self, path: str | Path, layout: Layout, index: int, offset: int, size: int, sample: Sample) -> None:
        if not self.files or self.files[-1][0] != str(path):
            self.files.append((str(path), layout))
        for key, value in zip(("file", "index", "offset", "size"), (len(self.files) - 1, index, offset, size),
                              strict=True):
            self._columns[key].append(value)
        for modality in sample.modal_inputs:
            self._counts.setdefault(modality, array("q", bytes(8 * (len(self) - 1))))
        for modality, column in self._counts.items():
            column.append(len(sample.modal_inputs.get(modality, ())))

    def frozen(self) -> StoredSamples:
        """These samples with their columns as numpy arrays (done once, after the last `add`)."""
        self.arrays = {k: np.frombuffer(v, dtype=np.int64) for k, v in self._columns.items()}
        self.counts = {m: np.frombuffer(v, dtype=np.int64) for m, v in self._counts.items()}
        return self

    def subset(self, indices: np.ndarray) -> StoredSamples:
        """The samples at `indices`, in that order."""
        chosen = StoredSamples(self._checker)
        chosen.files = self.files
        chosen.arrays = {k: v[indices] for k, v in self.arrays.items()}
        chosen.counts = {m: v[indices] for m, v in self.counts.items()}
        return chosen

    def __len__(self) -> int:
        return len(self.arrays["file"]) if self.arrays else len(self._columns["file"])

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        with Path(self.files[int(self.arrays["file"][index])][0]).open("rb") as handle:
            return self._read(int(index), handle)

    def __iter__(self) -> Iterator[Sample]:
        """Every sample in order, each file opened once."""
        handles: dict[int, BinaryIO] = {}
        with ExitStack() as stack:
            for index, file in enumerate(self.arrays["file"].tolist()):
                if file not in handles:
                    handles[file] = stack.enter_context(Path(self.files[file][0]).open("rb"))
                yield self._read(index, handles[file])

    def _read(self, index: int, handle: BinaryIO) -> Sample:
        file, record, offset, size = (int(self.arrays[k][index]) for k in ("file", "index", "offset", "size"))
        source, layout = self.files[file]
        handle.seek(offset)
        try:
            sample = self._checker.check(json.loads(handle.read(size)), layout, source, record)
        except (json.JSONDecodeError, UnicodeDecodeError):
            sample = BadSample(source, record, "", "not valid JSON any more")
        if isinstance(sample, BadSample):
            raise InputError(f"{sample} (the file changed after it was loaded)")
        return sample


def _validate(record: Any, layout: Layout, source: str, index: int, root: Path | None, purpose: Purpose,
              modalities: Collection[str] | None, marks: Mapping[str, str],
              counted: Sequence[str]) -> Sample | BadSample:
    def bad(where: str, message: str) -> BadSample:
        return BadSample(source, index, where, message, sample_id)

    sample_id = None
    if not isinstance(record, dict):
        return bad("", f"expected an object, got {type(record).__name__}")
    if isinstance(record.get("id"), (str, int)) and not isinstance(record.get("id"), bool):
        sample_id = str(record["id"])
    try:
        parsed: _Record | _LlavaRecord = (_LlavaRecord if layout == "llava" else _Record).model_validate(record)
    except ValidationError as error:
        first = error.errors()[0]
        where = _field_name(first["loc"])
        message = "missing" if first["type"] == "missing" else first["msg"]
        if where == "id" and first["type"] != "missing":
            message = f"must be a non-empty string or an integer, got {record['id']!r}"
        return bad(where, message)
    if sample_id == "":
        return bad("id", "must be a non-empty string or an integer")
    turns = [{"from": t.speaker, "value": t.value} for t in parsed.conversations]
    problem = _turn_problem(turns, purpose)
    if problem is not None:
        return bad("conversations", problem)

    if isinstance(parsed, _LlavaRecord):
        images = [parsed.image] if isinstance(parsed.image, str) else parsed.image or []
        raw_inputs = {"image": images} if images else {}
        category, references = None, ()
    else:
        raw_inputs = {}
        for key, files in parsed.modal_inputs.items():
            name = MODALITY_ALIASES.get(key, key)
            if name in raw_inputs:
                return bad("modal_inputs", f"both {key!r} and another key name modality {name!r}")
            raw_inputs[name] = files
        category = parsed.category
        references = ()
        if isinstance(parsed.meta, dict):
            try:
                references = tuple(r.strip() for r in _Meta.model_validate(parsed.meta).references)
            except ValidationError as error:
                return bad("meta." + _field_name(error.errors()[0]["loc"]), error.errors()[0]["msg"])
    inputs: dict[str, list[Path]] = {}
    for modality, files in raw_inputs.items():
        where = f"modal_inputs.{modality}" if layout == "modal_inputs" else "image"
        if modalities is not None and modality not in modalities:
            return bad(where, f"modality {modality!r}, which the model does not have (it has: "
                              f"{', '.join(modalities) or 'none'})")
        if not all(files):
            return bad(where, "empty path")
        inputs[modality] = [root / f if root is not None else Path(f) for f in files]
        if root is not None:
            missing = next((p for p in inputs[modality] if not p.is_file()), None)
            if missing is not None:
                return bad(where, f"{modality} file not found: {missing}")
    text = "".join(t["value"] for t in (turns[:-1] if turns[-1]["from"] == "gpt" and len(turns) > 1 else turns))
    for modality in dict.fromkeys((*counted, *inputs)):
        mark = marks.get(modality, f"<{modality}>")
        found, given = text.count(mark), len(inputs.get(modality, ()))
        if found != given:
            return bad("conversations", f"the human turns have {found} {mark} placeholder(s) but the sample has "
                                        f"{given} {modality} file(s)")
    answer = turns[-1]["value"].strip() if turns[-1]["from"] == "gpt" else None
    return Sample(id=str(parsed.id), conversations=turns, modal_inputs=inputs, answer=answer, category=category,
                  references=references, origin=(source, index))


def _turn_problem(turns: list[dict[str, str]], purpose: Purpose) -> str | None:
    if purpose == "eval":
        if not 1 <= len(turns) <= 2 or [t["from"] for t in turns] != ["human", "gpt"][:len(turns)]:
            return "must be one human turn and an optional gpt turn"
        return None
    expected = ["human", "gpt"] * (len(turns) // 2 + 1)
    if len(turns) < 2 or [t["from"] for t in turns] != expected[:len(turns)] or turns[-1]["from"] != "gpt":
        return "must alternate human and gpt turns, starting with human and ending with the gpt turn to learn"
    return None


def _field_name(loc: Sequence[Any]) -> str:
    """Pydantic's error location as a field path: ``conversations[0].from``, ``modal_inputs.image[1]``."""
    name = ""
    for part in loc:
        if part in ("str", "int", "list[str]", "constrained-str"):
            continue
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name
