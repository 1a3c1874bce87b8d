"""The shard format: TFRecord framing and tf.train.Example bytes, written and read without TensorFlow.

Pipeline workers must never import TensorFlow (it can grab a TPU), so the writer builds the
Example protobuf wire format by hand. The format is tiny and fixed (docs/FORMAT.md, "Records"):

    Example  { 1: Features }
    Features { 1: map<string, Feature> }           map entry = { 1: key, 2: value }
    Feature  { 1: BytesList | 3: Int64List }       BytesList{1: bytes}, Int64List{1: packed varints}

Int64 lists are encoded and decoded with vectorised NumPy varint code, so a row of 1024 tokens
costs a handful of array operations rather than a Python loop per token. Tests check these bytes
against real TensorFlow (tf.io.parse_single_example).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import queue
import struct
import threading
from typing import BinaryIO, Iterator

import google_crc32c
import numpy as np

from llm_activations.format import fileio
from llm_activations.format import hooks as hk

INT_FEATURES = ("token_ids", "doc_index", "token_index", "position")
ACTIVATIONS = "activations"
COMPRESSION_SUFFIX = {"none": ".tfrecord", "gzip": ".tfrecord.gz"}


# ----------------------------------------------------------------------------- paths


def shard_relpath(layer: int, shard: int, num_shards: int, compression: str = "none", hook: str = hk.DEFAULT) -> str:
    """Relative path of one shard: layer_03/part-00000-of-00004.tfrecord (mlp_out/layer_03/... for other hooks)."""
    return f"{hk.dirname(hook, layer)}/part-{shard:05d}-of-{num_shards:05d}{COMPRESSION_SUFFIX[compression]}"


def compression_of(path: str) -> str:
    return "gzip" if path.endswith(".gz") else "none"


# ----------------------------------------------------------------------------- varints


_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)  # 2**7, 2**14, ...


def _varint_sizes(v: np.ndarray) -> np.ndarray:
    """Bytes of each value's protobuf varint (1..10), for uint64 values [n]."""
    return 1 + np.searchsorted(_VARINT_LIMITS, v, side="right")


def _varint_encode(values: np.ndarray) -> bytes:
    """Protobuf varints of non-negative integers, vectorised: [n] -> bytes."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return b""
    return _varint_groups(v, _varint_sizes(v)).tobytes()


def _varint_groups(v: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """The varint bytes of uint64 values v [n] with known sizes, concatenated: uint8 [sum(nbytes)].

    Only as many 7-bit groups as the widest value needs are computed (token ids: 3, positions: 2).
    """
    width = int(nbytes.max())
    shifts = np.arange(width, dtype=np.uint64) * np.uint64(7)
    groups = (v[:, None] >> shifts[None, :]) & np.uint64(0x7F)  # [n, width] 7-bit groups
    k = np.arange(width)[None, :]
    cont = (k < (nbytes[:, None] - 1)).astype(np.uint64) << np.uint64(7)
    return (groups | cont)[k < nbytes[:, None]].astype(np.uint8)


def _varint_decode(buf: bytes | memoryview) -> np.ndarray:
    """Packed protobuf varints -> int64 array, vectorised."""
    b = np.frombuffer(buf, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(b < 0x80)
    if ends.size == 0 or ends[-1] != b.size - 1:
        raise ValueError("truncated varint list")
    starts = np.concatenate([[0], ends[:-1] + 1])
    group = np.repeat(np.arange(ends.size), ends - starts + 1)
    pos = np.arange(b.size) - starts[group]
    parts = (b & 0x7F).astype(np.uint64) << (np.uint64(7) * pos.astype(np.uint64))
    return np.add.reduceat(parts, starts).astype(np.int64)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated protobuf")
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def _varint_len(n: int) -> int:
    """Bytes of the varint of n >= 0: one per started 7 bits."""
    return max(1, (n.bit_length() + 6) // 7)


def _len_prefix(field: int, size: int) -> bytes:
    """Tag and length of a length-delimited field whose payload has `size` bytes."""
    return _varint((field << 3) | 2) + _varint(size)


def _len_field(field: int, payload: bytes) -> bytes:
    return _len_prefix(field, len(payload)) + payload


# ----------------------------------------------------------------------------- Example


def _feature_entry(key: str, feature: bytes) -> bytes:
    return _len_field(1, _len_field(1, key.encode()) + _len_field(2, feature))


def encode_example(activations: np.ndarray, **int_features: np.ndarray) -> bytes:
    """tf.train.Example bytes for one row: activations [n, H] (little-endian) + int64 lists.

    int_features are docs/FORMAT.md's token_ids, doc_index, token_index and position, each [n].
    """
    head, body, tail = example_parts(activations, int_features_tail(**int_features))
    return head + body.tobytes() + tail


def int_features_tail(**int_features: np.ndarray) -> bytes:
    """The Example's bytes after the activations: its four int64 list features, in docs/FORMAT.md's order."""
    return b"".join(_int_entry(key, _varint_encode(int_features[key])) for key in INT_FEATURES)


def _int_entry(key: str, packed: bytes) -> bytes:
    return _feature_entry(key, _len_field(3, _len_field(1, packed)))


def int_features_tails(lengths: np.ndarray, **int_features: np.ndarray) -> list[bytes]:
    """int_features_tail of every row of a batch at once: features [B, T], real tokens a prefix of
    `lengths` [B] per row. One vectorised varint pass per feature instead of one per row."""
    lengths = np.asarray(lengths, np.int64)
    real = np.arange(next(iter(int_features.values())).shape[1])[None, :] < lengths[:, None]  # [B, T]
    first_token = np.r_[0, np.cumsum(lengths)]  # [B + 1] row r's tokens are [first_token[r], first_token[r+1])
    per_key = []
    for key in INT_FEATURES:
        v = np.asarray(int_features[key])[real].astype(np.uint64)  # the rows' real prefixes, in row order
        nbytes = _varint_sizes(v)
        data = _varint_groups(v, nbytes).tobytes() if v.size else b""
        offsets = np.r_[0, np.cumsum(nbytes)][first_token].tolist()  # [B + 1] byte offsets of the rows
        per_key.append([_int_entry(key, data[a:b]) for a, b in zip(offsets[:-1], offsets[1:])])
    return [b"".join(parts) for parts in zip(*per_key)]


def example_parts(activations: np.ndarray, tail: bytes) -> tuple[bytes, np.ndarray, bytes]:
    """An Example as (head, body, tail) with body the activation bytes themselves, not a copy.

    head + body + tail is encode_example's bytes: the activations feature comes first, so every
    length in head can be computed from the sizes alone. body is a uint8 view of `activations`
    [n, H] (made little-endian and contiguous first if it is not already).
    """
    acts = np.ascontiguousarray(activations)
    if acts.dtype.byteorder == ">":
        acts = acts.astype(acts.dtype.newbyteorder("<"))
    body = acts.reshape(-1).view(np.uint8)
    key = ACTIVATIONS.encode()
    bytes_list = 1 + _varint_len(body.size) + body.size  # BytesList{1: raw}
    feature = 1 + _varint_len(bytes_list) + bytes_list  # Feature{1: BytesList}
    entry = 1 + _varint_len(len(key)) + len(key) + 1 + _varint_len(feature) + feature  # {1: key, 2: Feature}
    features = 1 + _varint_len(entry) + entry + len(tail)  # Features{1: entry, 1: entry, ...}
    head = b"".join((_len_prefix(1, features), _len_prefix(1, entry), _len_field(1, key), _len_prefix(2, feature),
                     _len_prefix(1, bytes_list), _len_prefix(1, body.size)))
    return head, body, tail


def _fields(buf: memoryview) -> Iterator[tuple[int, memoryview]]:
    """(field number, payload) of the length-delimited fields of one message."""
    i = 0
    while i < len(buf):
        tag, i = _read_varint(buf, i)
        if tag & 7 != 2:
            raise ValueError(f"unexpected protobuf wire type {tag & 7}")
        size, i = _read_varint(buf, i)
        if i + size > len(buf):
            raise ValueError("truncated protobuf")
        yield tag >> 3, buf[i : i + size]
        i += size


def decode_example(data: bytes, copy: bool = True) -> dict[str, object]:
    """Inverse of encode_example: {'activations': bytes, 'token_ids': int64 [n], ...}.

    copy=False: 'activations' is a zero-copy memoryview into data (the readers, whose record
    buffers are reused: a bytes copy per 7 MiB record cost ~0.25 CPU s/GiB, most of it page faults).
    Raises ValueError on bytes that are not such an Example.
    """
    out: dict[str, object] = {}
    for _, features in _fields(memoryview(data)):
        for _, entry in _fields(features):
            key, value = None, None
            for num, payload in _fields(entry):
                if num == 1:
                    key = bytes(payload).decode()
                elif num == 2:
                    value = payload
            if key is None or value is None:
                raise ValueError("malformed feature map entry")
            for kind, lst in _fields(value):
                values = [p for num, p in _fields(lst) if num == 1]
                if kind == 1:
                    out[key] = (bytes(values[0]) if copy else values[0]) if values else b""
                elif kind == 3:
                    out[key] = _varint_decode(b"".join(bytes(v) for v in values))
                else:
                    raise ValueError(f"feature {key!r} has an unsupported list kind {kind}")
    missing = [k for k in (ACTIVATIONS, *INT_FEATURES) if k not in out]
    if missing:
        raise ValueError(f"record lacks features {missing}")
    return out


def activation_bytes(data: bytes) -> memoryview:
    """The activation bytes of one Example as a zero-copy view, without decoding its int64 lists.

    Readers that only want the activations (the common SAE-training case) skip most of
    decode_example's work this way; at small hidden sizes the varint lists dominate decoding.
    """
    key = ACTIVATIONS.encode()
    for _, features in _fields(memoryview(data)):
        for _, entry in _fields(features):
            name = value = None
            for num, payload in _fields(entry):
                if num == 1:
                    name = payload
                elif num == 2:
                    value = payload
            if name == key and value is not None:
                for kind, lst in _fields(value):
                    if kind == 1:
                        return next((p for num, p in _fields(lst) if num == 1), memoryview(b""))
    raise ValueError("record has no activations feature")


def decode_activations(example: dict, dtype: np.dtype, hidden_size: int) -> np.ndarray:
    """The [n, hidden] activation matrix of a decoded example, checked against token count."""
    acts = np.frombuffer(example[ACTIVATIONS], dtype=np.dtype(dtype).newbyteorder("<"))
    n = len(example["token_ids"])
    if acts.size != n * hidden_size:
        raise ValueError(f"activations hold {acts.size} values, expected {n} tokens x {hidden_size}")
    return acts.reshape(n, hidden_size)


# ----------------------------------------------------------------------------- TFRecord framing


def _masked_crc(data: bytes) -> int:
    return _mask(google_crc32c.value(data))


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def frame_parts(head: bytes, body: np.ndarray, tail: bytes) -> tuple[bytes, np.ndarray, bytes]:
    """frame_record(head + body + tail) as three pieces, without joining them: (prefix, body, suffix).

    The data CRC is chained over the pieces (google_crc32c.extend takes a NumPy array; a memoryview
    it refuses). body is passed through untouched, so its bytes reach the file without a copy.
    """
    header = struct.pack("<Q", len(head) + body.size + len(tail))
    crc = google_crc32c.extend(google_crc32c.extend(google_crc32c.value(head), body), tail)
    return (header + struct.pack("<I", _masked_crc(header)) + head, body, tail + struct.pack("<I", _mask(crc)))


def record_length(header: bytes, check_crc: bool = True) -> int:
    """The data length a 12-byte TFRecord header announces; ValueError if truncated or corrupt."""
    if len(header) < 12:
        raise ValueError("truncated record header")
    (length,) = struct.unpack("<Q", header[:8])
    if check_crc and struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
        raise ValueError("length CRC mismatch")
    return length


def check_data_crc(data, footer, check_crc: bool = True) -> None:
    """ValueError unless footer (4 bytes) is the masked CRC32C of data (bytes or a uint8 array)."""
    if check_crc and struct.unpack("<I", bytes(footer))[0] != _masked_crc(data):
        raise ValueError("data CRC mismatch")


def iter_records(stream: BinaryIO, check_crc: bool = True) -> Iterator[bytes]:
    """TFRecord payloads of an (already decompressed) stream; ValueError on corruption."""
    while True:
        header = stream.read(12)
        if not header:
            return
        length = record_length(header, check_crc)
        data = stream.read(length)
        footer = stream.read(4)
        if len(data) < length or len(footer) < 4:
            raise ValueError("truncated record")
        check_data_crc(data, footer, check_crc)
        yield data


def open_shard(path: str) -> BinaryIO:
    """A binary stream of a shard's decompressed bytes: local paths or any Beam filesystem URL."""
    raw = fileio.open_read(path)
    if compression_of(path) == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw, buffer_size=1 << 20)


def read_shard(path: str, check_crc: bool = True) -> Iterator[bytes]:
    with open_shard(path) as stream:
        try:
            yield from iter_records(stream, check_crc)
        except ValueError as e:  # a reader interleaves many files: say which one is corrupt
            raise ValueError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- writing shards


class ShardWriter:
    """Writes one shard file and describes it as it goes (records, tokens, bytes, sha256).

    The file is opened with fileio.open_for_commit and committed on close, so a crashed or retried
    writer never leaves a half-written shard under the final name (local files: temporary name +
    rename; GCS: a direct upload finalized on close), and a retry that rewrites the same rows
    produces the same bytes. The sha256 and size are of the bytes on disk (compressed, with gzip),
    hashed as they are written.

    With hash_in_background, a thread of its own hashes the pieces while the caller's thread
    writes them (hashlib and file writes both release the GIL, so the two run on two cores);
    pieces must then stay unmodified until close().
    """

    def __init__(self, path: str, compression: str = "none", hash_in_background: bool = False):
        self.path = path
        self.compression = compression
        self._sha = _BackgroundSha256() if hash_in_background else hashlib.sha256()
        self.records = self.tokens = self.bytes = 0
        self._file = fileio.open_for_commit(path)
        self._hashing = _HashingWriter(self._file, self)
        # mtime=0 and no filename keep gzip output byte-identical across reruns.
        self._out = (gzip.GzipFile(fileobj=self._hashing, mode="wb", mtime=0, filename="")
                     if compression == "gzip" else self._hashing)

    def write(self, example: bytes, num_tokens: int) -> None:
        self._out.write(frame_record(example))
        self.records += 1
        self.tokens += num_tokens

    def write_parts(self, parts: tuple, num_tokens: int) -> None:
        """One record given as frame_parts' pieces, written one after the other (never joined)."""
        for piece in parts:
            self._out.write(piece)
        self.records += 1
        self.tokens += num_tokens

    def close(self) -> dict:
        if self._out is not self._hashing:
            self._out.close()  # writes the gzip trailer through the hashing writer
        self._file.commit()
        return {"records": self.records, "tokens": self.tokens, "bytes": self.bytes, "sha256": self._sha.hexdigest()}

    def abort(self) -> None:
        """Give up on the file (its writer failed): stop a background hasher and discard the file
        (fileio.CommitWriter.abort: the temporary file is deleted, a GCS upload cancelled)."""
        self._sha.hexdigest()
        self._file.abort()


class _HashingWriter:
    """Passes bytes to the file and into the owner's sha256 and byte count."""

    def __init__(self, raw, owner: ShardWriter):
        self._raw, self._owner = raw, owner

    def write(self, data) -> int:
        self._owner._sha.update(data)  # first: a background hasher starts while the bytes are written
        self._raw.write(data)
        self._owner.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()


class _BackgroundSha256:
    """hashlib.sha256's update/hexdigest, with the hashing done by a thread of its own.

    The queue is bounded (in pieces: about two batches of rows), so the hasher never falls more
    than that behind the writer and the arrays it still refers to stay few.
    """

    DEPTH = 96

    def __init__(self):
        self._sha = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(self.DEPTH)
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def update(self, data) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._sha.hexdigest()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._sha.update(data)
