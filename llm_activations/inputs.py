"""Input documents: patterns -> sorted files -> work units -> (doc_index, text) or a rejection.

doc_index follows docs/FORMAT.md ("Records"): a record's line (JSONL) or row (parquet) number, counting on from the
records of earlier files in sorted path order; a .txt file is one record; for hf:// it is the
record's index in the split. Work is planned on the launcher as *work units*: contiguous
[start, stop) ranges of doc_index that may span files, so a unit's documents can be read, packed
and written by one worker without any shuffle of the data itself.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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
    row_groups: tuple = ()  # parquet: the first row of each row group
    # hf://: how many file shards `datasets` streams the split from (IterableDataset.num_shards);
    # 0 when it is one stream (one file, or a builder that exposes no files)
    num_shards: int = 0
    # Uncompressed JSON lines: ((line, byte offset), ...) for every k-th line, recorded by the
    # launcher's one scan, so that a unit seeks to its first line instead of reading from line 0.
    # Launcher-only: plan_units gives each unit the one offset it needs and drops the rest.
    checkpoints: tuple = field(default=(), compare=False, repr=False)

    def whole_file_only(self) -> bool:
        """A file a unit can only read from its start: compressed streams cannot seek, and a .txt
        file is one record. Unit boundaries move to such a file's edges (plan_units)."""
        return bool(self.compression) or self.kind == "txt"


@dataclass(frozen=True)
class WorkUnit:
    """Documents [start, stop) of the global doc_index, read from `pieces` of files."""

    index: int
    start: int
    stop: int
    pieces: tuple  # ((SourceFile, first record in file, stop record in file), ...)
    starts: tuple = ()  # per piece: (line, byte offset) to seek to before reading, or None (from the start)

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


HF_SHARD_STRIDE = 1 << 32  # doc_index of record i of file shard j: j * stride + i (FORMAT.md, "Records")


def check_hf(spec: str, text_field: str) -> int:
    """Open the split and read its first record on the launcher: a missing split, an unreachable hub
    or a wrong --text-field is one line here, not a traceback from a worker. Returns the split's
    number of file shards (0 if it is one stream)."""
    try:
        dataset = _load_hf(spec)
        first = next(iter(dataset), None)
    except UsageError:
        raise
    except Exception as e:  # datasets raises ValueError, FileNotFoundError, ConnectionError, ...
        why = (str(e).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"{spec}: cannot read this split ({type(e).__name__}: {why})") from None
    if first is not None and not get_field(first, text_field)[0]:
        fields = ", ".join(list(first)[:8]) if isinstance(first, dict) else type(first).__name__
        raise UsageError(f"{spec}: its first record has no field {text_field!r} (fields: {fields}); pass --text-field")
    shards = int(getattr(dataset, "num_shards", 1) or 1)
    return shards if shards > 1 else 0


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


def _parquet_rows(path: str, text_field: str) -> tuple[int, tuple]:
    """(rows, first row of each row group) from the footer; refuses a file without --text-field."""
    import pyarrow.parquet as pq

    with fileio.open_read(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise UsageError(f"{path}: not a readable parquet file ({e})") from None
        if not _parquet_field_ok(pf.schema_arrow, text_field):
            raise UsageError(f"{path}: parquet file has no column {text_field!r} (columns: "
                             f"{', '.join(pf.schema_arrow.names)}); pass --text-field (a.b for a nested field)")
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        return pf.metadata.num_rows, tuple(sum(sizes[:g]) for g in range(len(sizes)))


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


@dataclass(frozen=True)
class Scan:
    """What the launcher learns from one pass over a file (see scan_file)."""

    num_records: int
    digest: str
    row_groups: tuple = ()
    checkpoints: tuple = ()


HEAD = 1 << 16  # bytes read for the up-front checks when a file's scan is cached
CHECKPOINT_EVERY = 4  # lines between two recorded offsets (doubled while a file has too many)
MAX_CHECKPOINTS = 1 << 16  # per file: the launcher's memory stays bounded whatever the file's length


def scan_file(path: str, text_field: str, cache: "ScanCache | None" = None) -> Scan:
    """Records, content digest and seek points of one file, in one streaming pass over its bytes;
    with a cache, no pass at all for a local file whose scan is cached (same size, mtime, ctime
    and inode), only a read of its head.

    Also refuses, in one line, what would otherwise reject every record: compressed bytes under an
    uncompressed name, or a JSON lines file whose first records lack --text-field.
    """
    kind, compression = file_type(path)
    entry = cache.entry(path) if cache is not None else None
    cached = cache.get(entry) if entry is not None else None
    if kind == "parquet":
        rows, groups = _parquet_rows(path, text_field)
        scan = cached or Scan(rows, content_digest(path), groups)
    elif cached is not None:
        with open_decompressed(path, compression) as stream:
            try:
                head = stream.read(HEAD)
            except (OSError, EOFError, ValueError) as e:
                raise UsageError(f"{path}: cannot be decompressed as {compression} ({e})") from None
        _check_head(path, kind, compression, head, text_field)
        scan = cached
    else:
        scan = _scan_stream(path, kind, compression, text_field)
    if entry is not None and cached is None:
        cache.put(entry, scan)
    return scan


def _scan_stream(path: str, kind: str, compression: str, text_field: str) -> Scan:
    """Count lines (and record every k-th line's byte offset, uncompressed) while hashing the raw bytes."""
    import numpy as np

    with fileio.HashingReader(fileio.open_read(path)) as hashed:
        stream = _decompressed(hashed, compression)
        every, points = CHECKPOINT_EVERY, [(0, 0)]
        try:
            n, pos, last, head = 0, 0, b"\n", b""
            while chunk := stream.read(1 << 22):
                if not head:
                    head = chunk
                newlines = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
                if not compression:  # offsets in a decompressed stream cannot be seeked to
                    lines = n + 1 + np.arange(len(newlines))  # the line that starts after each newline
                    keep = lines % every == 0
                    points += zip(lines[keep].tolist(), (pos + newlines[keep] + 1).tolist())
                    if len(points) > MAX_CHECKPOINTS:
                        every *= 2
                        points = [p for p in points if p[0] % every == 0]
                n += len(newlines)
                pos += len(chunk)
                last = chunk[-1:]
        except (OSError, EOFError, ValueError) as e:  # gzip / zstd / bz2 errors
            raise UsageError(f"{path}: cannot be decompressed as {compression} ({e})") from None
        hashed.drain()  # bytes after a compressed stream's end are part of the file too
        digest = "sha256:" + hashed.sha.hexdigest()
    _check_head(path, kind, compression, head, text_field)
    if kind == "txt":
        return Scan(1, digest)
    # a final line without a newline is a record
    return Scan(n + (last != b"\n"), digest, checkpoints=tuple(points) if not compression else ())


def _check_head(path: str, kind: str, compression: str, head: bytes, text_field: str) -> None:
    if not compression:
        for magic, name in MAGIC.items():
            if head.startswith(magic):
                raise UsageError(f"{path}: holds {name}-compressed bytes; name it {path}{SUFFIXES[name]}")
    if kind == "txt":
        return
    head = head.removeprefix(BOM)
    if head.strip():
        _check_json_lines(path, head, text_field)


class ScanCache:
    """Scans of local input files, one small JSON file each under `folder`, keyed by the file's real
    path, size, mtime_ns, ctime_ns and inode: a rerun over unchanged inputs reads none of their
    bytes. ctime and the inode are in the key because a user can set a file's mtime back (cp -p,
    rsync -t, os.utime) but not its ctime: an edit that keeps size and mtime is still a miss.

    It lives on the launcher, beside other per-user caches ($XDG_CACHE_HOME, else ~/.cache), not in
    the output folder: a scan belongs to the input, which many runs and outputs share, and an
    output folder is emptied by --overwrite. A cache that cannot be read or written is skipped:
    it only ever saves time.
    """

    def __init__(self, folder: str, min_bytes: int = 1 << 20):
        # smaller files are scanned faster than a cache entry is written and read back
        self.folder, self.min_bytes = folder, min_bytes

    @staticmethod
    def default() -> "ScanCache":
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return ScanCache(os.path.join(base, "llm_activations", "input-scans"))

    def entry(self, path: str) -> "ScanEntry | None":
        """This file's entry, taken before it is scanned (a file that changes during its scan is
        then a miss next time, not a hit on a stale scan); None for a remote, unreadable or small file."""
        if fileio.is_url(path):
            return None
        try:
            st = os.stat(path)
        except OSError:
            return None
        if st.st_size < self.min_bytes:
            return None
        key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        return ScanEntry(key, os.path.join(self.folder, hashlib.sha256(key.encode()).hexdigest()[:32] + ".json"))

    def get(self, entry: "ScanEntry") -> Scan | None:
        try:
            with open(entry.file) as f:
                found = json.load(f)
            if found.get("key") != entry.key:
                return None
            return Scan(int(found["num_records"]), str(found["digest"]), tuple(found["row_groups"]),
                        tuple(tuple(p) for p in found["checkpoints"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, entry: "ScanEntry", scan: Scan) -> None:
        try:
            os.makedirs(self.folder, exist_ok=True)
            tmp = f"{entry.file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"key": entry.key, "num_records": scan.num_records, "digest": scan.digest,
                           "row_groups": list(scan.row_groups), "checkpoints": [list(p) for p in scan.checkpoints]}, f)
            os.replace(tmp, entry.file)
        except OSError:
            pass


@dataclass(frozen=True)
class ScanEntry:
    """A file's key in a ScanCache (real path, size, mtime_ns, ctime_ns, inode) and its entry's path."""

    key: str
    file: str


def plan_sources(patterns: list[str], text_field: str, cache: ScanCache | None = None) -> list[SourceFile]:
    """Every input file, scanned (see scan_file), with its doc_index offset. Files on an object
    store are scanned 16 at a time."""
    files = expand_patterns(patterns)
    if files[0].startswith("hf://"):
        return [SourceFile(files[0], "hf", -1, 0, num_shards=check_hf(files[0], text_field))]
    scan = lambda f: scan_file(f, text_field, cache)  # noqa: E731
    if fileio.is_url(files[0]):  # each file costs a request's latency: overlap them
        with ThreadPoolExecutor(16) as pool:
            scans = list(pool.map(scan, files))
    else:  # local: disk and CPU bound, and thread hand-offs would cost small files more than their scan
        scans = [scan(f) for f in files]
    sources, offset = [], 0
    for path, scan in zip(files, scans):
        kind, compression = file_type(path)
        sources.append(SourceFile(path, kind, scan.num_records, offset, compression, scan.digest,
                                  row_groups=scan.row_groups, checkpoints=scan.checkpoints))
        offset += scan.num_records
    return sources


def snap(boundary: int, sources: list[SourceFile]) -> int:
    """The doc_index nearest to `boundary` at which a unit (or a host's share) can begin without
    reading records before it: any line of an uncompressed JSON lines file; only the edges of a
    compressed or .txt file (a stream cannot seek); in parquet, a row group's first row (pyarrow
    reads a row group whole, so an edge inside one would have both units read it). Ties go to the
    earlier point. sources are in doc_index order (plan_sources), so the one file that can hold
    the boundary is found by bisection: the launcher snaps every unit edge."""
    i = bisect.bisect_right(sources, boundary, key=lambda s: s.first_index) - 1
    if i < 0:
        return boundary
    s = sources[i]
    lo, hi = s.first_index, s.first_index + s.num_records
    if not lo < boundary < hi:
        return boundary
    if s.whole_file_only():
        points = [lo, hi]
    elif s.kind == "parquet" and s.row_groups:
        points = [lo + g for g in s.row_groups] + [hi]
    else:
        return boundary
    return min(points, key=lambda p: (abs(p - boundary), p))


def host_range(total: int, num_hosts: int, host_index: int) -> tuple[int, int]:
    """This host's contiguous, disjoint share [start, stop) of `total` records."""
    return total * host_index // num_hosts, total * (host_index + 1) // num_hosts


def unit_edges(sources: list[SourceFile], *, start: int, stop: int, num_units: int, keep_empty: bool) -> list[int]:
    """Edges of num_units even units over [start, stop), each moved to where reading can begin
    (snap). Two edges that snap to one point make an empty unit: kept when the user asked for
    num_units files (--num-shards), merged away when the planner chose the number (fewer, larger
    units)."""
    edges = [start] + [min(stop, max(start, snap(start + (stop - start) * u // num_units, sources)))
                       for u in range(1, num_units)] + [stop]
    edges = list(itertools.accumulate(edges, max))  # stays monotone after snapping
    if not keep_empty:
        edges = [start] + [e for prev, e in zip(edges, edges[1:]) if e > prev]
        edges = edges if len(edges) > 1 else [start, stop]  # no records at all: still one unit
    return edges


def plan_units(sources: list[SourceFile], *, start: int, stop: int, num_units: int,
               keep_empty: bool = True) -> list[WorkUnit]:
    """Split doc_index range [start, stop) into contiguous units whose edges are where reading can
    begin (unit_edges): num_units of them, some perhaps empty, or with keep_empty=False as many as
    remain non-empty (at least one). Every input byte is then read by one unit only; each piece of
    an uncompressed JSON lines file records the offset to seek to.
    """
    edges = unit_edges(sources, start=start, stop=stop, num_units=num_units, keep_empty=keep_empty)
    units = []
    by_path = {s.path: s for s in sources}
    for u in range(len(edges) - 1):
        lo, hi = edges[u], edges[u + 1]
        last = u == len(edges) - 2
        pieces = tuple(
            (replace(s, checkpoints=()), max(lo, s.first_index) - s.first_index,
             min(hi, s.first_index + s.num_records) - s.first_index)
            for s in sources
            if s.num_records < 0
            or (lo < hi and s.first_index < hi and s.first_index + s.num_records > lo)  # (an empty unit reads nothing)
            # an empty file owns no doc_index; the unit at its position reports it as rejected
            or (s.num_records == 0 and (lo <= s.first_index < hi or (last and s.first_index >= hi)))
        )
        starts = tuple(_seek_point(by_path[s.path], first) for s, first, _ in pieces)
        units.append(WorkUnit(u, lo, hi, pieces, starts if any(starts) else ()))
    return units


def _seek_point(src: SourceFile, first: int) -> tuple | None:
    """(line, byte offset) of the last checkpoint at or before line `first`, or None (read from 0)."""
    import bisect

    if first <= 0 or not src.checkpoints:
        return None
    i = bisect.bisect_right(src.checkpoints, (first, float("inf"))) - 1
    return tuple(src.checkpoints[i]) if i > 0 else None


def plan_hf_units(src: SourceFile, *, first: int, stop: int, num_units: int) -> list[WorkUnit]:
    """Units over an hf:// split's file shards [first, stop): each unit reads whole shards, so
    workers and hosts read disjoint files. Its doc_index range is [first, stop) x HF_SHARD_STRIDE."""
    units = []
    for u in range(num_units):
        lo = first + (stop - first) * u // num_units
        hi = first + (stop - first) * (u + 1) // num_units
        units.append(WorkUnit(u, lo * HF_SHARD_STRIDE, hi * HF_SHARD_STRIDE, ((src, lo, hi),)))
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


def _read_jsonl(src: SourceFile, lo: int, hi: int, text_field: str, start: tuple | None = None):
    """Lines [lo, hi) of a JSON lines file; start (line, byte offset) skips to a checkpoint first."""
    line0, offset = start or (0, 0)
    with open_decompressed(src.path, src.compression) as f:
        if offset:
            f.seek(offset)
        for i in range(line0, hi):  # never reads the line after the unit's last
            line = f.readline()
            if not line:
                break
            if i < lo:
                continue
            if i == 0:
                line = line.removeprefix(BOM)  # editors on Windows start UTF-8 files with one
            line = line.rstrip(b"\r\n")
            if not line.strip():  # blank separator lines hold no data; their index is simply unused
                continue
            yield _parse_json_line(line, src.first_index + i, src.path, text_field)


@functools.lru_cache(maxsize=16)
def _parquet_footer(path: str, digest: str):
    """A parquet file's metadata, read once per worker process for all the units it reads of that
    file (keyed by content digest too, so a changed file is read afresh). The footer can be large
    (min/max statistics of a text column hold whole documents), and re-reading it per unit would
    add its size to every unit's read."""
    import pyarrow.parquet as pq

    with fileio.open_read(path) as f:
        return pq.ParquetFile(f).metadata


def _read_parquet(src: SourceFile, lo: int, hi: int, text_field: str):
    import pyarrow.parquet as pq

    footer = _parquet_footer(src.path, src.digest)
    with fileio.open_read(src.path) as f:
        pf = pq.ParquetFile(f, metadata=footer)
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


def _read_hf_shards(src: SourceFile, lo: int, hi: int, text_field: str):
    """File shards [lo, hi) of an hf:// split (IterableDataset.shard: one data file each)."""
    dataset = _load_hf(src.path)
    for j in range(lo, hi):
        for i, record in enumerate(dataset.shard(num_shards=src.num_shards, index=j)):
            doc_index = j * HF_SHARD_STRIDE + i
            found, value = get_field(record, text_field)
            if not found:
                yield Rejected(doc_index, src.path, f"record has no field {text_field!r}", _excerpt(record))
                continue
            yield _check_text(value, doc_index, src.path, text_field)


READERS = {"parquet": _read_parquet, "txt": _read_txt}  # jsonl: read_unit passes its byte offset


def read_unit(unit: WorkUnit, text_field: str, num_hosts: int = 1, host_index: int = 0) -> Iterator[Document | Rejected]:
    """Every record of a work unit in doc_index order, as a Document or a Rejected."""
    starts = unit.starts or (None,) * len(unit.pieces)
    for (src, lo, hi), start in zip(unit.pieces, starts):
        if src.kind == "hf" and src.num_shards:
            yield from _read_hf_shards(src, lo, hi, text_field)
        elif src.kind == "hf":
            yield from _read_hf(src, unit.start, unit.stop, text_field, num_hosts, host_index)
        elif src.num_records == 0 and lo == 0:
            yield Rejected(None, src.path, "empty file", "")
        elif src.kind == "jsonl":
            yield from _read_jsonl(src, lo, hi, text_field, start)
        else:
            yield from READERS[src.kind](src, lo, hi, text_field)
