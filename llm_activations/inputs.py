"""Input documents: patterns -> sorted files -> work units -> (doc_index, text) or a rejection.

doc_index follows SPEC: a record's line (JSONL) or row (parquet) number, counting on from the
records of earlier files in sorted path order; a .txt file is one record; for hf:// it is the
record's index in the split. Work is planned on the launcher as *work units*: contiguous
[start, stop) ranges of doc_index that may span files, so a unit's documents can be read, packed
and written by one worker without any shuffle of the data itself.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Iterator

from llm_activations.format import fileio
from llm_activations.errors import UsageError

KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}
EXCERPT = 200


@dataclass(frozen=True)
class SourceFile:
    path: str
    kind: str  # jsonl | parquet | txt | hf
    num_records: int  # -1 for an hf:// stream of unknown length
    first_index: int  # doc_index of its first record


@dataclass(frozen=True)
class WorkUnit:
    """Documents [start, stop) of the global doc_index, read from `pieces` of files."""

    index: int
    start: int
    stop: int
    pieces: tuple  # ((SourceFile, first record in file, stop record in file), ...)


@dataclass(frozen=True)
class Document:
    doc_index: int
    text: str


@dataclass(frozen=True)
class Rejected:
    doc_index: int | None
    source: str
    reason: str
    excerpt: str

    def to_json(self) -> str:
        return json.dumps({"doc_index": self.doc_index, "source": self.source, "reason": self.reason,
                           "excerpt": self.excerpt}, ensure_ascii=False)


# ----------------------------------------------------------------------------- hf:// specs


def parse_hf(spec: str) -> tuple[str, str | None, str]:
    """hf://NAME[/CONFIG]:SPLIT -> (name, config, split). NAME is org/name, or a local folder."""
    body = spec[len("hf://"):]
    if ":" not in body:
        raise UsageError(f"{spec}: expected hf://NAME[/CONFIG]:SPLIT, e.g. hf://HuggingFaceFW/fineweb-edu/sample-10BT:train")
    path, split = body.rsplit(":", 1)
    if os.path.isdir(path):  # a local dataset folder read through `datasets`
        return path, None, split
    parts = path.split("/")
    name = "/".join(parts[:2])
    config = "/".join(parts[2:]) or None
    return name, config, split


def _load_hf(spec: str):
    import datasets

    name, config, split = parse_hf(spec)
    return datasets.load_dataset(name, config, split=split, streaming=True)


# ----------------------------------------------------------------------------- planning


def expand_patterns(patterns: list[str]) -> list[str]:
    """Sorted, de-duplicated files matching the patterns (local or any Beam filesystem)."""
    if any(p.startswith("hf://") for p in patterns):
        if len(patterns) > 1:
            raise UsageError("an hf:// input cannot be combined with other inputs (doc_index would be ambiguous)")
        return list(patterns)
    files: set[str] = set()
    for pattern in patterns:
        try:
            matches = fileio.match([pattern])
        except Exception:  # Beam raises when a glob matches nothing on some filesystems
            matches = []
        found = [m for m in matches if not m.endswith("/")]
        if not found:
            raise UsageError(f"--input {pattern!r} matches no file")
        files.update(found)
    for f in sorted(files):
        if kind_of(f) is None:
            raise UsageError(f"{f}: unsupported input type; use .jsonl, .json (JSON lines), .parquet, .txt or hf://NAME:SPLIT")
    return sorted(files)


def kind_of(path: str) -> str | None:
    if path.startswith("hf://"):
        return "hf"
    return KINDS.get(os.path.splitext(path)[1].lower())


def count_records(path: str, text_field: str) -> int:
    """Number of records (doc_index slots) in one file, cheaply; checks parquet schemas."""
    kind = kind_of(path)
    if kind == "txt":
        return 1
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fileio.open_read(path) as f:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:
                raise UsageError(f"{path}: not a readable parquet file ({e})") from None
            if text_field not in pf.schema_arrow.names:
                raise UsageError(f"{path}: parquet file has no column {text_field!r} (columns: "
                                 f"{', '.join(pf.schema_arrow.names)}); pass --text-field")
            return pf.metadata.num_rows
    n, last = 0, b"\n"
    with fileio.open_read(path) as f:
        while chunk := f.read(1 << 22):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")  # a final line without a newline is still a record


def plan_sources(patterns: list[str], text_field: str) -> list[SourceFile]:
    files = expand_patterns(patterns)
    if files[0].startswith("hf://"):
        return [SourceFile(files[0], "hf", -1, 0)]
    sources, offset = [], 0
    for path in files:
        n = count_records(path, text_field)
        sources.append(SourceFile(path, kind_of(path), n, offset))
        offset += n
    return sources


def host_range(total: int, num_hosts: int, host_index: int) -> tuple[int, int]:
    """This host's contiguous, disjoint share [start, stop) of `total` records."""
    return total * host_index // num_hosts, total * (host_index + 1) // num_hosts


def plan_units(sources: list[SourceFile], *, start: int, stop: int, num_units: int) -> list[WorkUnit]:
    """Split doc_index range [start, stop) into num_units contiguous units (some may be empty)."""
    units = []
    for u in range(num_units):
        lo = start + (stop - start) * u // num_units
        hi = start + (stop - start) * (u + 1) // num_units
        last = u == num_units - 1
        pieces = tuple(
            (s, max(lo, s.first_index) - s.first_index, min(hi, s.first_index + s.num_records) - s.first_index)
            for s in sources
            if s.num_records < 0
            or (s.first_index < hi and s.first_index + s.num_records > lo)
            # an empty file owns no doc_index; the unit at its position reports it as rejected
            or (s.num_records == 0 and (lo <= s.first_index < hi or (last and s.first_index >= hi)))
        )
        units.append(WorkUnit(u, lo, hi, pieces))
    return units


def auto_num_units(num_docs: int, docs_per_unit: int) -> int:
    return max(1, math.ceil(num_docs / docs_per_unit))


# ----------------------------------------------------------------------------- reading


def _excerpt(value) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text[:EXCERPT]


def _check_text(value, doc_index: int, source: str, text_field: str) -> Document | Rejected:
    if value is None:
        return Rejected(doc_index, source, f"field {text_field!r} is null", "")
    if not isinstance(value, str):
        return Rejected(doc_index, source, f"field {text_field!r} is {type(value).__name__}, not a string", _excerpt(value))
    if not value.strip():
        return Rejected(doc_index, source, "empty text", _excerpt(value))
    return Document(doc_index, value)


def _parse_json_line(line: bytes, doc_index: int, source: str, text_field: str) -> Document | Rejected:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return Rejected(doc_index, source, f"invalid UTF-8 ({e.reason} at byte {e.start})", _excerpt(line))
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return Rejected(doc_index, source, f"malformed JSON ({e.msg} at column {e.colno})", _excerpt(text))
    if not isinstance(record, dict):
        return Rejected(doc_index, source, f"record is a JSON {type(record).__name__}, not an object", _excerpt(text))
    if text_field not in record:
        return Rejected(doc_index, source, f"record has no field {text_field!r}", _excerpt(text))
    return _check_text(record[text_field], doc_index, source, text_field)


def _read_jsonl(src: SourceFile, lo: int, hi: int, text_field: str):
    with fileio.open_read(src.path) as f:
        for i, line in enumerate(f):
            if i >= hi:
                break
            if i < lo:
                continue
            line = line.rstrip(b"\r\n")
            if not line.strip():  # blank separator lines hold no data; their index is simply unused
                continue
            yield _parse_json_line(line, src.first_index + i, src.path, text_field)


def _read_parquet(src: SourceFile, lo: int, hi: int, text_field: str):
    import pyarrow.parquet as pq

    with fileio.open_read(src.path) as f:
        pf = pq.ParquetFile(f)
        row0 = 0
        for g in range(pf.num_row_groups):
            rows = pf.metadata.row_group(g).num_rows
            if row0 + rows > lo and row0 < hi:
                column = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
                for i in range(max(lo, row0), min(hi, row0 + rows)):
                    yield _check_text(column[i - row0], src.first_index + i, src.path, text_field)
            row0 += rows


def _read_txt(src: SourceFile, lo: int, hi: int, text_field: str):
    if lo > 0 or hi < 1:
        return
    with fileio.open_read(src.path) as f:
        data = f.read()
    if not data:
        yield Rejected(src.first_index, src.path, "empty file", "")
        return
    if b"\x00" in data[:8192]:
        yield Rejected(src.first_index, src.path, "binary file (NUL bytes)", _excerpt(data[:EXCERPT]))
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Rejected(src.first_index, src.path, f"invalid UTF-8 ({e.reason} at byte {e.start})", _excerpt(data))
        return
    yield _check_text(text, src.first_index, src.path, text_field)


def _read_hf(src: SourceFile, lo: int, hi: int, text_field: str, num_hosts: int = 1, host_index: int = 0):
    dataset = _load_hf(src.path)
    for i, record in enumerate(dataset):
        if hi >= 0 and i >= hi:
            break
        if i < lo or i % num_hosts != host_index:
            continue
        if not isinstance(record, dict) or text_field not in record:
            yield Rejected(i, src.path, f"record has no field {text_field!r}", _excerpt(record))
            continue
        yield _check_text(record[text_field], i, src.path, text_field)


READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "txt": _read_txt}


def read_unit(unit: WorkUnit, text_field: str, num_hosts: int = 1, host_index: int = 0) -> Iterator[Document | Rejected]:
    """Every record of a work unit in doc_index order, as a Document or a Rejected."""
    for src, lo, hi in unit.pieces:
        if src.kind == "hf":
            yield from _read_hf(src, unit.start, unit.stop, text_field, num_hosts, host_index)
        elif src.num_records == 0 and lo == 0:
            yield Rejected(None, src.path, "empty file", "")
        else:
            yield from READERS[src.kind](src, lo, hi, text_field)
