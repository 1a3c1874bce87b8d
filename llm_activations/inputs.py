"""Input documents: patterns -> sorted files -> work units -> (doc_index, text) or a rejection.

doc_index follows docs/FORMAT.md ("Records"): a record's line (JSONL) or row (parquet) number, counting on from the
records of earlier files in sorted path order; a .txt file is one record; for hf:// it is the
record's index in the split. Work is planned on the launcher as *work units*: contiguous
[start, stop) ranges of doc_index that may span files, so a unit's documents can be read, packed
and written by one worker without any shuffle of the data itself.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import posixpath
from dataclasses import dataclass
from typing import Iterator

from llm_activations.format import fileio
from llm_activations.errors import UsageError

KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "txt"}
# Compressed JSON lines and text, as real corpora ship them (the suffix decides, as in Beam's
# CompressionTypes.AUTO). Parquet compresses its own pages.
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bzip2"}
# Leading bytes of compressed data: a file whose name says "uncompressed" but whose bytes start so
# is refused up front, instead of every line being rejected as malformed JSON.
MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2"}
SUFFIXES = {name: suffix for suffix, name in COMPRESSIONS.items()}
BOM = b"\xef\xbb\xbf"
FIELD_PROBE = 100  # records of each JSON lines file checked for --text-field on the launcher
EXCERPT = 200


@dataclass(frozen=True)
class SourceFile:
    path: str
    kind: str  # jsonl | parquet | txt | hf
    num_records: int  # -1 for an hf:// stream of unknown length
    first_index: int  # doc_index of its first record
    compression: str = ""  # "" | gzip | zstd | bzip2
    digest: str = ""  # content fingerprint (content_digest); "" for hf://


@dataclass(frozen=True)
class WorkUnit:
    """Documents [start, stop) of the global doc_index, read from `pieces` of files."""

    index: int
    start: int
    stop: int
    pieces: tuple  # ((SourceFile, first record in file, stop record in file), ...)

    def input_fingerprint(self) -> str:
        """A hash of exactly the input this unit reads: its range and each piece's file, record range
        and content digest. `--resume` keeps a finished unit only if this is unchanged."""
        pieces = [(s.path, s.kind, s.num_records, s.first_index, s.compression, s.digest, lo, hi) for s, lo, hi in self.pieces]
        return hashlib.sha256(json.dumps([self.start, self.stop, pieces]).encode()).hexdigest()[:16]


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


def check_hf(spec: str, text_field: str) -> None:
    """Open the split and read its first record on the launcher: a missing split, an unreachable hub
    or a wrong --text-field is one line here, not a traceback from a worker."""
    try:
        first = next(iter(_load_hf(spec)), None)
    except UsageError:
        raise
    except Exception as e:  # datasets raises ValueError, FileNotFoundError, ConnectionError, ...
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"{spec}: cannot read this split ({type(e).__name__}: {why})") from None
    if first is not None and not get_field(first, text_field)[0]:
        fields = ", ".join(list(first)[:8]) if isinstance(first, dict) else type(first).__name__
        raise UsageError(f"{spec}: its first record has no field {text_field!r} (fields: {fields}); pass --text-field")


# ----------------------------------------------------------------------------- planning


def expand_patterns(patterns: list[str]) -> list[str]:
    """Sorted files matching the patterns (local or any Beam filesystem), each file once.

    A file named twice (two patterns, a relative and an absolute spelling, a symlink) is one file:
    local paths are identified by their real path, URLs by their normalised form. A folder stands
    for every file below it, recursively (names starting with "." or "_" are skipped, as Hadoop and
    Beam do for markers such as _SUCCESS); a file of an unsupported type is refused wherever it is.
    """
    if any(p.startswith("hf://") for p in patterns):
        if len(patterns) > 1:
            raise UsageError("an hf:// input cannot be combined with other inputs (doc_index would be ambiguous)")
        return list(patterns)
    files: dict[str, str] = {}  # identity -> path
    for pattern in patterns:
        found = _match_input(pattern)
        if not found:
            raise UsageError(f"--input {pattern!r} matches no file")
        for f in sorted(found):
            files.setdefault(_identity(f), f)
    for f in sorted(files.values()):
        if file_type(f)[0] is None:
            raise UsageError(f"{f}: unsupported input type; use .jsonl, .json, .ndjson (JSON lines, optionally .gz, "
                             ".zst or .bz2), .parquet, .txt or hf://NAME:SPLIT; a folder must hold only such files")
    return sorted(files.values())


def _match_input(pattern: str) -> list[str]:
    """Files for one --input: a file, a folder (recursively) or a glob."""
    if fileio.is_url(pattern):
        if not any(c in pattern for c in "*?[") and not fileio.exists(pattern):
            pattern = pattern.rstrip("/") + "/**"  # a folder (prefix) of an object store
        try:
            found = fileio.match([pattern])
        except Exception:  # Beam raises when a glob matches nothing on some filesystems
            return []
        return [f for f in found if not f.endswith("/") and not _hidden(f)]
    if os.path.isdir(pattern):
        return [os.path.abspath(os.path.join(d, f)) for d, dirs, fs in os.walk(pattern)
                for f in fs if not f.startswith((".", "_"))
                if not any(part.startswith((".", "_")) for part in os.path.relpath(d, pattern).split(os.sep) if part != ".")]
    try:
        found = fileio.match([pattern])
    except Exception:
        return []
    return [os.path.abspath(f) for f in found if os.path.isfile(f)]


def _hidden(url: str) -> bool:
    return posixpath.basename(url).startswith((".", "_"))


def _identity(path: str) -> str:
    """One key per file, whatever the spelling."""
    if fileio.is_url(path):
        scheme, rest = fileio.split_url(path)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.realpath(path)


def file_type(path: str) -> tuple[str | None, str]:
    """(kind, compression) from the file name: ("jsonl", "gzip") for x.jsonl.gz; (None, "") if unsupported."""
    if path.startswith("hf://"):
        return "hf", ""
    stem, ext = os.path.splitext(path.lower())
    compression = COMPRESSIONS.get(ext, "")
    if compression:
        stem, ext = os.path.splitext(stem)
    kind = KINDS.get(ext)
    if kind == "parquet" and compression:  # parquet compresses its pages itself
        return None, ""
    return kind, compression if kind else ""


class _Hashing:
    """A read-through binary stream that hashes the raw bytes it passes on (sha256)."""

    def __init__(self, raw):
        self._raw, self.sha = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.sha.update(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(1 << 22):
            pass

    def close(self) -> None:
        self._raw.close()


def _decompressed(raw, compression: str):
    """A binary stream of the decompressed bytes of raw."""
    if compression == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bzip2":
        import bz2

        return bz2.BZ2File(raw, mode="rb")
    if compression == "zstd":
        import zstandard

        import io

        # its reader has no readline: buffer it so a JSON lines file iterates line by line
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), 1 << 20)
    return raw


@contextlib.contextmanager
def open_decompressed(path: str, compression: str):
    raw = fileio.open_read(path)
    try:
        with contextlib.closing(_decompressed(raw, compression)) as stream:
            yield stream
    finally:
        raw.close()


def content_digest(path: str) -> str:
    """The content fingerprint `--resume` compares: "sha256:<hex>" of the file's bytes; for a file on
    an object store, the store's own checksum (reading terabytes on the launcher to hash them would
    cost more than the run). Modification times are not part of it: a file touched but unchanged
    keeps its units, one rewritten with the same length does not."""
    if fileio.is_url(path):
        return f"store:{fileio.checksum(path)}"
    return "sha256:" + fileio.sha256_file(path)[0]


def get_field(record, text_field: str):
    """(found, value) of a field of a JSON / HF record; a dotted name such as meta.content walks into
    nested objects (an exact top-level key of that name wins)."""
    if not isinstance(record, dict):
        return False, None
    if text_field in record:
        return True, record[text_field]
    value = record
    for part in text_field.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _parquet_field_ok(schema, text_field: str) -> bool:
    import pyarrow as pa

    if text_field in schema.names:
        return True
    parts = text_field.split(".")
    if parts[0] not in schema.names:
        return False
    typ = schema.field(parts[0]).type
    for part in parts[1:]:
        if not pa.types.is_struct(typ) or typ.get_field_index(part) < 0:
            return False
        typ = typ.field(part).type
    return True


def _count_parquet(path: str, text_field: str) -> int:
    import pyarrow.parquet as pq

    with fileio.open_read(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise UsageError(f"{path}: not a readable parquet file ({e})") from None
        if not _parquet_field_ok(pf.schema_arrow, text_field):
            raise UsageError(f"{path}: parquet file has no column {text_field!r} (columns: "
                             f"{', '.join(pf.schema_arrow.names)}); pass --text-field (a.b for a nested field)")
        return pf.metadata.num_rows


def _check_json_lines(path: str, head: bytes, text_field: str) -> None:
    """Refuse, up front, a JSON lines file whose first records all lack --text-field (as parquet does
    for a missing column), or that is one JSON array rather than one object per line."""
    if head.lstrip().startswith(b"["):  # JSON lines records are objects: a "[" opens one array
        raise UsageError(f"{path}: holds a JSON array, not JSON lines (one object per line); convert it, "
                         "e.g. jq -c '.[]' FILE > FILE.jsonl")
    objects, keys = 0, collections.Counter()
    for line in head.split(b"\n")[:-1][:FIELD_PROBE] if b"\n" in head else [head]:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            objects += 1
            if get_field(record, text_field)[0]:
                return
            keys.update(record)
    if objects:
        raise UsageError(f"{path}: none of its first {objects} records has a field {text_field!r} (fields: "
                         f"{', '.join(k for k, _ in keys.most_common(8))}); pass --text-field (a.b for a nested field)")


def scan_file(path: str, text_field: str) -> tuple[int, str]:
    """(number of records, content digest) of one file, in one streaming pass over its bytes.

    Also refuses, in one line, what would otherwise reject every record: compressed bytes under an
    uncompressed name, or a JSON lines file whose first records lack --text-field.
    """
    kind, compression = file_type(path)
    if kind == "parquet":
        return _count_parquet(path, text_field), content_digest(path)
    with fileio.open_read(path) as raw:
        hashing = _Hashing(raw)
        stream = _decompressed(hashing, compression)
        try:
            n, last, head = 0, b"\n", b""
            while chunk := stream.read(1 << 22):
                if not head:
                    head = chunk
                n += chunk.count(b"\n")
                last = chunk[-1:]
        except (OSError, EOFError, ValueError) as e:  # gzip / zstd / bz2 errors
            raise UsageError(f"{path}: cannot be decompressed as {compression} ({e})") from None
        hashing.drain()
    if not compression:
        for magic, name in MAGIC.items():
            if head.startswith(magic):
                raise UsageError(f"{path}: holds {name}-compressed bytes; name it {path}{SUFFIXES[name]}")
    if kind == "txt":
        return 1, "sha256:" + hashing.sha.hexdigest()
    head = head.removeprefix(BOM)
    if head.strip():
        _check_json_lines(path, head, text_field)
    return n + (last != b"\n"), "sha256:" + hashing.sha.hexdigest()  # a final line without a newline is a record


def plan_sources(patterns: list[str], text_field: str) -> list[SourceFile]:
    files = expand_patterns(patterns)
    if files[0].startswith("hf://"):
        check_hf(files[0], text_field)
        return [SourceFile(files[0], "hf", -1, 0)]
    sources, offset = [], 0
    for path in files:
        n, digest = scan_file(path, text_field)
        kind, compression = file_type(path)
        sources.append(SourceFile(path, kind, n, offset, compression, digest))
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
    found, value = get_field(record, text_field)
    if not found:
        return Rejected(doc_index, source, f"record has no field {text_field!r}", _excerpt(text))
    return _check_text(value, doc_index, source, text_field)


def _read_jsonl(src: SourceFile, lo: int, hi: int, text_field: str):
    with open_decompressed(src.path, src.compression) as f:
        for i, line in enumerate(f):
            if i >= hi:
                break
            if i < lo:
                continue
            if i == 0:
                line = line.removeprefix(BOM)  # editors on Windows start UTF-8 files with one
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
                if text_field not in pf.schema_arrow.names:  # a nested field: rows are {child: ...} structs
                    column = [get_field({text_field.split(".")[0]: v}, text_field)[1] for v in column]
                for i in range(max(lo, row0), min(hi, row0 + rows)):
                    yield _check_text(column[i - row0], src.first_index + i, src.path, text_field)
            row0 += rows


def _read_txt(src: SourceFile, lo: int, hi: int, text_field: str):
    if lo > 0 or hi < 1:
        return
    with open_decompressed(src.path, src.compression) as f:
        data = f.read().removeprefix(BOM)
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
        found, value = get_field(record, text_field)
        if not found:
            yield Rejected(i, src.path, f"record has no field {text_field!r}", _excerpt(record))
            continue
        yield _check_text(value, i, src.path, text_field)


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
