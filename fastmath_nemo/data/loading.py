"""Load math problems (and optional solution traces) from local files into ``MathRecord``s.

Supported sources, all read through the ``datasets`` library the way its users read them:

- JSON Lines (``.jsonl``, ``.json``; a ``.json`` file may also hold one top-level array of
  objects): ``load_dataset("json", data_files=..., streaming=True)``.
- Parquet (``.parquet``) and Arrow IPC (``.arrow``) files: ``load_dataset("parquet" | "arrow", ...)``.
- Directories written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: ``load_from_disk``.

Nothing here touches the network: the builder name is always given explicitly and the path is
passed as an (escaped) local ``data_files`` entry, so a path is never taken for a Hub id.
``streaming=True`` is used for files so nothing is written to the ``datasets`` cache.

Errors name where the bad row is: ``file.jsonl:17`` (1-based line) for JSON, ``file.parquet:
row 3`` (0-based, i.e. ``dataset[3]``) for Parquet / Arrow / saved datasets. With
``skip_bad_rows=True`` bad rows are skipped, counted, logged at WARNING and listed in the
optional ``LoadReport``; nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import glob
import heapq
import json
import logging
import math
import os
import tempfile
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from fastmath_nemo.data.records import MathRecord

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)

# How many "location: reason" examples go into a warning or an error message.
_REASONS_SHOWN = 5


class DataError(ValueError):
    """Bad input data: the message names the file and the line / row."""


@dataclass(frozen=True)
class BadRow:
    location: str  # "file.jsonl:17" or "file.parquet: row 3"
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


@dataclass
class LoadReport:
    """Filled in by ``load_records(..., report=LoadReport())``.

    rows_read: rows looked at (good + bad; rows after ``limit`` was reached are not read).
    loaded:    records returned.
    skipped:   every bad row skipped (only non-empty with ``skip_bad_rows=True``).
    """

    source: str = ""
    rows_read: int = 0
    loaded: int = 0
    skipped: list[BadRow] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


@dataclass(frozen=True)
class _Fields:
    problem: str
    answer: str
    trace: str | None

    @property
    def names(self) -> list[str]:
        return [self.problem, self.answer] + ([self.trace] if self.trace is not None else [])


def load_records(
    path: str | os.PathLike[str],
    *,
    problem_field: str = "problem",
    answer_field: str = "answer",
    trace_field: str | None = None,
    split: str | None = None,
    skip_bad_rows: bool = False,
    limit: int | None = None,
    report: LoadReport | None = None,
) -> list[MathRecord]:
    """Read ``MathRecord``s from a local file or saved ``datasets`` directory.

    A row is bad when a needed field is missing / null, the problem is empty, the answer is
    empty, not a string or number, or has unbalanced ``{}``, or (with ``trace_field``) the trace
    is missing or empty. Numbers are accepted as answers and converted (``42`` -> ``"42"``).
    ``problem`` and ``answer`` are stripped of surrounding whitespace; ``trace`` is kept verbatim.

    split: for a saved ``DatasetDict``, which split to read (may be omitted when it has only one).
        Files and single saved ``Dataset``s have exactly one split, ``"train"``.
    skip_bad_rows: skip bad rows (logged at WARNING with the count and the first reasons)
        instead of raising ``DataError`` at the first one.
    limit: return at most this many records (the first good ones, in file order); rows after
        the limit is reached are neither read nor validated.
    report: optional ``LoadReport`` that is reset and filled in (counts, skipped rows).

    Raises ``DataError`` (a ``ValueError``) for unreadable input, a field absent from the
    whole source (even with ``skip_bad_rows``), a bad row (without ``skip_bad_rows``), or when
    no record at all could be loaded.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    fields = _Fields(problem_field, answer_field, trace_field)
    src = Path(path).expanduser()
    if report is None:
        report = LoadReport()
    report.source, report.rows_read, report.loaded, report.skipped = str(src), 0, 0, []

    if not src.exists():
        raise DataError(f"{src}: no such file or directory")
    if src.is_dir():
        rows = _saved_dataset_rows(src, split, fields)
    else:
        _check_single_split(src, split)
        suffix = src.suffix.lower()
        if suffix in JSON_SUFFIXES:
            rows = _json_rows(src, fields)
        elif suffix in PARQUET_SUFFIXES:
            rows = _columnar_rows(src, "parquet", fields)
        elif suffix in ARROW_SUFFIXES:
            rows = _columnar_rows(src, "arrow", fields)
        else:
            supported = ", ".join(JSON_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES)
            raise DataError(
                f"{src}: unsupported file type {src.suffix!r} (supported: {supported}, "
                "or a directory written by Dataset.save_to_disk)"
            )

    records: list[MathRecord] = []
    with contextlib.closing(rows):
        if limit == 0:
            return records
        for location, row in rows:
            report.rows_read += 1
            outcome = row if isinstance(row, str) else _to_record(row, fields, location)
            if isinstance(outcome, MathRecord):
                records.append(outcome)
                if limit is not None and len(records) >= limit:
                    break
                continue
            bad = BadRow(location, outcome)
            if not skip_bad_rows:
                raise DataError(f"{bad} (pass skip_bad_rows=True to skip bad rows)")
            report.skipped.append(bad)

    report.loaded = len(records)
    if report.skipped:
        logger.warning(
            "%s: skipped %d bad row(s) of %d read; first: %s",
            src,
            report.num_skipped,
            report.rows_read,
            "; ".join(str(b) for b in report.skipped[:_REASONS_SHOWN]),
        )
    if not records:
        if report.rows_read == 0:
            raise DataError(f"{src}: contains no rows")
        shown = "; ".join(str(b) for b in report.skipped[:_REASONS_SHOWN])
        raise DataError(f"{src}: all {report.rows_read} rows are bad; first: {shown}")
    logger.info("%s: loaded %d records", src, len(records))
    return records


# ---------------------------------------------------------------------------------------------
# Row validation (shared by all formats)


def _to_record(row: dict[str, Any], fields: _Fields, location: str) -> MathRecord | str:
    """A ``MathRecord`` or the reason the row is bad."""
    texts: dict[str, str] = {}
    for name in fields.names:
        value = row.get(name)
        if value is None:
            present = sorted(k for k, v in row.items() if v is not None)
            # A column of a table is always present: None there is a null cell, not a missing key.
            what = "null" if name in row else "missing"
            return f"{what} field {name!r} (non-null fields in this row: {present})"
        text = _as_text(value, allow_numbers=name != fields.trace)
        if text is None:
            kind = "a string or number" if name != fields.trace else "a string"
            return f"field {name!r} must be {kind}, got {type(value).__name__}"
        texts[name] = text
    problem = texts[fields.problem].strip()
    answer = texts[fields.answer].strip()
    if not problem:
        return f"empty problem (field {fields.problem!r})"
    if not answer:
        return f"empty answer (field {fields.answer!r})"
    brace_error = _brace_error(answer)
    if brace_error is not None:
        return f"unparseable answer {_clip(answer)!r}: {brace_error}"
    trace = None
    if fields.trace is not None:
        trace = texts[fields.trace]
        if not trace.strip():
            return f"empty trace (field {fields.trace!r})"
    return MathRecord(problem=problem, answer=answer, trace=trace, source=location)


def _as_text(value: Any, *, allow_numbers: bool) -> str | None:
    if isinstance(value, str):
        return value
    # bool is an int subclass, but True is never a math answer: reject it.
    if allow_numbers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if allow_numbers and isinstance(value, float) and math.isfinite(value):
        return str(value)
    return None


def _brace_error(text: str) -> str | None:
    """Why ``{``/``}`` in ``text`` do not balance, or None. ``\\{`` and ``\\}`` are literals."""
    depth = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character (covers \{, \} and \\)
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return f"unbalanced braces: '}}' at offset {i} has no matching '{{'"
        i += 1
    if depth:
        return f"unbalanced braces: {depth} '{{' never closed"
    return None


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Sources. Each yields (location, row dict | reason string) in file order.

_Row = tuple[str, dict[str, Any] | str]


def _check_single_split(src: Path, split: str | None) -> None:
    if split not in (None, "train"):
        raise DataError(f"{src}: a single file has only the split 'train', not {split!r}")


def _require_columns(label: str, columns: Iterable[str], fields: _Fields) -> None:
    present = set(columns)
    for name in fields.names:
        if name not in present:
            raise DataError(f"{label}: field {name!r} not found; fields present: {sorted(present)}")


def _data_files(src: Path) -> dict[str, str]:
    # data_files entries are glob patterns: escape so "run[1].jsonl" is read, not silently
    # matched against nothing (datasets then yields zero rows without complaint).
    return {"train": glob.escape(str(src.resolve()))}


@dataclass
class _JsonScan:
    # "order" numbers items in file order (several array items may share a line).
    good: list[tuple[int, str]] = field(default_factory=list)  # (order, location) per good row
    bad: list[tuple[int, str, str]] = field(default_factory=list)  # (order, location, reason)
    keys: set[str] = field(default_factory=set)  # union over all JSON objects
    objects: int = 0  # JSON objects seen, good or bad
    needs_copy: bool = False
    copy_lines: list[str] = field(default_factory=list)  # normalized good rows, if needs_copy


def _json_rows(src: Path, fields: _Fields) -> Generator[_Row, None, None]:
    """Pre-validate with ``json`` (for ``file:line`` errors), then read through ``datasets``.

    ``datasets``' JSON loader reports malformed lines poorly, chokes on blank lines, and
    mangles columns mixing strings and numbers (it has turned ``"007"`` into ``7`` and ``"b"``
    into ``'"b"'``). So when the file has any of these, the good rows are written, with only the
    needed fields and numbers turned into strings, to a temporary JSONL that ``datasets`` reads.
    """
    scan = _scan_json(src, fields)
    if not scan.good and not scan.bad:
        return
    if scan.objects:
        _require_columns(str(src), scan.keys, fields)

    with tempfile.TemporaryDirectory(prefix="fastmath_records_") as tmp:
        if scan.needs_copy:
            target = Path(tmp) / "rows.jsonl"
            target.write_text("".join(scan.copy_lines), encoding="utf-8")
        else:
            target = src
        good = _iter_dataset_rows(src, "json", target, expected=len(scan.good), fields=fields)
        # Not strict: when limit stops us early the dataset side has rows left.
        good_rows = ((order, loc, row) for (order, loc), row in zip(scan.good, good, strict=False))
        for _, location, row in heapq.merge(scan.bad, good_rows, key=lambda item: item[0]):
            yield location, cast("dict[str, Any] | str", row)
        # zip stops at the shorter input: make sure the dataset side is exhausted too,
        # so a row-count mismatch is raised by _iter_dataset_rows instead of passing silently.
        for _ in good:
            pass


def _scan_json(src: Path, fields: _Fields) -> _JsonScan:
    scan = _JsonScan()
    try:
        raw = src.read_bytes()
    except OSError as e:
        raise DataError(f"{src}: cannot read: {e}") from e
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{src}:{line}: not valid UTF-8 ({e.reason})") from e

    if text.lstrip().startswith("["):
        items = _json_array_items(src, text)
        scan.needs_copy = True  # rewritten as JSON Lines: fewer code paths inside datasets
    else:
        items = _json_lines_items(src, text, scan)

    for order, (line, obj) in enumerate(items):
        location = f"{src}:{line}"
        if isinstance(obj, str):  # a reason
            scan.bad.append((order, location, obj))
            continue
        if not isinstance(obj, dict):
            reason = f"expected a JSON object, got {type(obj).__name__}"
            scan.bad.append((order, location, reason))
            continue
        scan.objects += 1
        scan.keys.update(obj)
        problem = _json_row_problem(obj, fields)
        if problem is not None:
            scan.bad.append((order, location, problem))
            continue
        normalized: dict[str, str | None] = {}
        for name in fields.names:
            value = obj.get(name)
            if value is not None and not isinstance(value, str):
                scan.needs_copy = True  # a number; checked by _json_row_problem
                value = _as_text(value, allow_numbers=True)
            normalized[name] = value
        scan.good.append((order, location))
        scan.copy_lines.append(json.dumps(normalized, ensure_ascii=False) + "\n")
    if scan.bad:
        scan.needs_copy = True
    if not scan.needs_copy:
        scan.copy_lines = []
    return scan


def _json_lines_items(src: Path, text: str, scan: _JsonScan) -> Iterator[tuple[int, Any]]:
    hint = " (a .json file must be JSON Lines or one top-level array)" if src.suffix == ".json" else ""
    lines = text.split("\n")
    for line, content in enumerate(lines, start=1):
        if not content.strip():
            if line < len(lines) or content:
                scan.needs_copy = True  # a blank line, which datasets' JSON reader may reject
            continue
        try:
            yield line, json.loads(content)
        except json.JSONDecodeError as e:
            yield line, f"malformed JSON: {e.msg} at column {e.colno}{hint}"


def _json_array_items(src: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on.

    A syntax error inside an array always raises: we could not tell where the next element
    starts, so it cannot be skipped.
    """
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_space(pos: int) -> int:
        while pos < n and text[pos].isspace():
            pos += 1
        return pos

    def fail(pos: int, msg: str) -> DataError:
        return DataError(f"{src}:{text.count(chr(10), 0, pos) + 1}: malformed JSON array: {msg}")

    pos = skip_space(text.index("[") + 1)
    first = True
    while True:
        if pos >= n:
            raise fail(pos, "unexpected end of file (missing ']')")
        if text[pos] == "]":
            pos += 1
            break
        if not first:
            if text[pos] != ",":
                raise fail(pos, f"expected ',' or ']', found {text[pos]!r}")
            pos = skip_space(pos + 1)
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{src}:{e.lineno}: malformed JSON: {e.msg} at column {e.colno}") from e
        yield text.count("\n", 0, pos) + 1, obj
        pos = skip_space(end)
        first = False
    if text[pos:].strip():
        raise fail(pos, "extra data after the closing ']'")


def _json_row_problem(obj: dict[str, Any], fields: _Fields) -> str | None:
    """Reasons a parsed JSON object cannot be handed to datasets (checked before loading)."""
    for name in fields.names:
        value = obj.get(name)
        if value is None:
            what = "null" if name in obj else "missing"  # {"answer": null} is there, but empty
            return f"{what} field {name!r} (fields present: {sorted(obj)})"
        if _as_text(value, allow_numbers=name != fields.trace) is None:
            kind = "a string or number" if name != fields.trace else "a string"
            return f"field {name!r} must be {kind}, got {type(value).__name__}"
    return None


def _columnar_rows(src: Path, builder: str, fields: _Fields) -> Generator[_Row, None, None]:
    columns = _file_columns(src, builder)
    _require_columns(str(src), columns, fields)
    expected = _file_num_rows(src, builder)
    rows = _iter_dataset_rows(src, builder, src, expected=expected, fields=fields)
    for i, row in enumerate(rows):
        yield f"{src}: row {i}", row


def _file_columns(src: Path, builder: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if builder == "parquet":
            return list(pq.read_schema(src).names)
        return list(_ipc_reader(src).schema.names)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{src}: cannot read as {builder}: {e}") from e


def _file_num_rows(src: Path, builder: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if builder == "parquet":
            return int(pq.ParquetFile(src).metadata.num_rows)
        reader = _ipc_reader(src)
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        return sum(batch.num_rows for batch in reader)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{src}: cannot read as {builder}: {e}") from e


def _ipc_reader(src: Path) -> Any:
    """A reader for an Arrow IPC file in either the file or the stream format (memory-mapped)."""
    import pyarrow as pa

    source = pa.memory_map(str(src))
    try:
        return pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source)


def _iter_dataset_rows(
    src: Path, builder: str, target: Path, *, expected: int, fields: _Fields
) -> Iterator[dict[str, Any]]:
    """Rows of ``target`` read by ``datasets.load_dataset(builder, streaming=True)``."""
    from datasets import Features, Value, load_dataset

    kwargs: dict[str, Any] = {}
    if builder == "parquet":
        kwargs["columns"] = fields.names  # skip reading unrelated (possibly huge) columns
    if builder == "json" and target != src:
        # Our normalized copy: every needed field is a string or null.
        kwargs["features"] = Features({name: Value("string") for name in fields.names})
    try:
        ds = load_dataset(builder, data_files=_data_files(target), split="train", streaming=True, **kwargs)
        count = 0
        for row in ds:
            count += 1
            yield row
    except DataError:
        raise
    except Exception as e:  # datasets wraps parser errors in many types; keep the cause
        raise DataError(f"{src}: datasets could not read this {builder} file: {type(e).__name__}: {e}") from e
    if count != expected:
        raise DataError(f"{src}: datasets returned {count} rows, the file has {expected}")


def _saved_dataset_rows(src: Path, split: str | None, fields: _Fields) -> Generator[_Row, None, None]:
    from datasets import Dataset, DatasetDict, load_from_disk

    if not ((src / "dataset_dict.json").exists() or (src / "state.json").exists()):
        raise DataError(
            f"{src}: a directory must be written by Dataset.save_to_disk / DatasetDict.save_to_disk "
            "(no state.json or dataset_dict.json found)"
        )
    try:
        loaded = load_from_disk(str(src))
    except Exception as e:
        raise DataError(f"{src}: load_from_disk failed: {type(e).__name__}: {e}") from e

    if isinstance(loaded, DatasetDict):
        splits = sorted(loaded)
        if split is None:
            if len(splits) != 1:
                raise DataError(f"{src}: has splits {splits}; pass split= to pick one")
            split = splits[0]
        if split not in loaded:
            raise DataError(f"{src}: no split {split!r}; splits: {splits}")
        ds = loaded[split]
        label = f"{src}[{split}]"
    elif isinstance(loaded, Dataset):
        _check_single_split(src, split)
        ds, label = loaded, str(src)
    else:  # pragma: no cover - load_from_disk returns one of the two
        raise DataError(f"{src}: unexpected {type(loaded).__name__} from load_from_disk")

    _require_columns(label, ds.column_names, fields)
    ds = ds.select_columns(fields.names)
    for i, row in enumerate(ds):
        yield f"{label}: row {i}", row

