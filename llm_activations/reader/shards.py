"""Reading shard files: records into pooled buffers, lazily by offset where the file allows it,
and every shard checked against metadata (bytes when opened, records when its pass ends).

Why the checks: a shard file that is empty, cut exactly at a record boundary or has a record
appended frames correctly, so CRCs alone would deliver fewer or more tokens than metadata says
without a word (issue 22). Checks raise ValueError naming the file, like a CRC mismatch.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from llm_activations.format import fileio
from llm_activations.format import records
from llm_activations.reader.buffers import BufferPool
from llm_activations.reader.spec import ShardInfo


def check_bytes(shard: ShardInfo, size: int | None) -> None:
    """The file's size on disk against metadata's `bytes` (before reading it)."""
    if shard.bytes is not None and size is not None and size != shard.bytes:
        raise ValueError(f"{shard.path}: the file has {size} bytes, metadata says {shard.bytes}; "
                         "the shard was truncated, emptied or appended to (run validate)")


def check_records(shard: ShardInfo, seen: int) -> None:
    """The records a complete pass over the file found, against metadata's `records`."""
    if shard.records is not None and seen != shard.records:
        raise ValueError(f"{shard.path}: the file holds {seen} records, metadata says {shard.records} "
                         "(run validate)")


def record_buffer(pool: BufferPool, length: int) -> np.ndarray:
    """A pooled buffer for a record's data and its CRC (capacity a power of two, shared by similar lengths).

    Why pooled: read() returns a new bytes object per record (7 MiB at hidden 3584), and with
    records held in the queue and, for gzip or URL shards, in the record shuffle buffer, they
    churned the heap (tens of thousands of page faults per GiB).
    """
    return pool.take((1 << (length + 3).bit_length(),), np.uint8)[: length + 4]


def _checked(buf: np.ndarray, check_crc: bool) -> np.ndarray:
    """The data of a record read into buf (data + CRC), after checking the CRC."""
    data = buf[:-4]
    records.check_data_crc(data, buf[-4:], check_crc)
    return data


def _read_into(stream, buf: np.ndarray) -> int:
    """Fill buf from stream (readinto where the stream has it); the number of bytes read."""
    if not hasattr(stream, "readinto"):  # tf.io.gfile.GFile
        data = stream.read(len(buf))
        buf[: len(data)] = np.frombuffer(data, np.uint8)
        return len(data)
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def framed_records(stream, check_crc: bool, pool: BufferPool) -> Iterator[np.ndarray]:
    """records.iter_records, reading each record into a pooled buffer instead of a new bytes object.
    The TFRecord framing (records.frame_record): [length u64][masked crc32c of length u32][data][masked crc32c of data u32]."""
    while True:
        header = stream.read(12)
        if not header:
            return
        length = records.record_length(header, check_crc)
        buf = record_buffer(pool, length)
        if _read_into(stream, buf) < len(buf):
            raise ValueError("truncated record")
        yield _checked(buf, check_crc)


def _counted(shard: ShardInfo, stream, check_crc: bool, pool: BufferPool) -> Iterator[np.ndarray]:
    seen = 0
    try:
        for data in framed_records(stream, check_crc, pool):
            seen += 1
            yield data
    except ValueError as e:  # a reader interleaves many files: say which one is corrupt
        raise ValueError(f"{shard.path}: {e}") from None
    check_records(shard, seen)


def read_shard(shard: ShardInfo, check_crc: bool, pool: BufferPool) -> Iterator[np.ndarray]:
    """Every record of a shard (local or a Beam filesystem URL, gzip or not), read in order."""
    check_bytes(shard, fileio.size(shard.path))
    with records.open_shard(shard.path) as stream:
        yield from _counted(shard, stream, check_crc, pool)


def gfile_records(shard: ShardInfo, pool: BufferPool) -> Iterator[np.ndarray]:
    """Records of a shard at any tf.io.gfile location (gs://, ram://, ...), CRC-checked."""
    import tensorflow as tf

    check_bytes(shard, tf.io.gfile.stat(shard.path).length)
    with tf.io.gfile.GFile(shard.path, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if records.compression_of(shard.path) == "gzip" else raw
        yield from _counted(shard, stream, True, pool)


def gfile_read_text(path: str) -> str | None:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        return f.read()


@dataclass(frozen=True)
class RecordRef:
    """Where a record of a local, uncompressed shard lies; read only when the shuffle releases it."""

    path: str
    offset: int  # of the record's data, after its 12-byte header
    length: int


def is_lazy(path: str) -> bool:
    """Local uncompressed shards are shuffled as RecordRefs and read late; others are read first."""
    return not fileio.is_url(path) and records.compression_of(path) == "none"


def record_refs(shard: ShardInfo, check_crc: bool = True) -> Iterator[RecordRef]:
    """Walk a local, uncompressed shard's record headers, reading no data.

    Why: the record shuffle buffer then holds ~W tokens of (path, offset, length) instead of ~W
    tokens of record bytes (448 MiB at the defaults), and each record is read once, when it
    leaves the buffer, into a buffer the pool has just recycled (still in cache).
    """
    path = shard.path
    with open(path, "rb", buffering=0) as f:
        size, pos, seen = os.fstat(f.fileno()).st_size, 0, 0
        check_bytes(shard, size)
        try:
            while pos < size:
                length = records.record_length(os.pread(f.fileno(), 12, pos), check_crc)
                if pos + 16 + length > size:
                    raise ValueError("truncated record")
                seen += 1
                yield RecordRef(path, pos + 12, length)
                pos += 16 + length
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    check_records(shard, seen)


def load(ref: RecordRef, check_crc: bool, fds: dict, pool: BufferPool) -> np.ndarray:
    """Read a released record into a pooled buffer; fds keeps one descriptor per file for the pass
    (opening the file for every record cost an open and a close per ~7 MiB)."""
    buf = record_buffer(pool, ref.length)
    fd = fds.get(ref.path)
    if fd is None:
        fd = fds[ref.path] = os.open(ref.path, os.O_RDONLY)
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = os.preadv(fd, [view[got:]], ref.offset + got)
        if not n:
            raise ValueError(f"{ref.path}: truncated record")
        got += n
    try:
        return _checked(buf, check_crc)
    except ValueError as e:
        raise ValueError(f"{ref.path}: {e}") from None


def activations_only(data: np.ndarray, dtype: np.dtype, hidden_size: int) -> np.ndarray:
    """[n, hidden] zero-copy view of a record's activations (its int64 lists are not decoded)."""
    acts = np.frombuffer(records.activation_bytes(data), dtype=dtype)
    if acts.size % hidden_size:
        raise ValueError(f"activations hold {acts.size} values, not a multiple of hidden size {hidden_size}")
    return acts.reshape(-1, hidden_size)
