"""The shard format: TFRecord framing and tf.train.Example bytes, written and read without TensorFlow.

Pipeline workers must never import TensorFlow (it can grab a TPU), so the writer builds the
Example protobuf wire format by hand. The format is tiny and fixed (SPEC "Records"):

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
import struct
from typing import BinaryIO, Iterator

import google_crc32c
import numpy as np

from llm_activations.format import fileio
from llm_activations.format import hooks as hk

INT_FEATURES = ("token_ids", "doc_index", "token_index", "position")
ACTIVATIONS = "activations"
COMPRESSION_SUFFIX = {"none": ".tfrecord", "gzip": ".tfrecord.gz"}


# ----------------------------------------------------------------------------- paths


def layer_dirname(layer: int, hook: str = hk.DEFAULT) -> str:
    """Folder of one layer's shards, relative to the dataset root: layer_03 (resid_post), z/layer_03."""
    return hk.dirname(hook, layer)


def shard_relpath(layer: int, shard: int, num_shards: int, compression: str = "none", hook: str = hk.DEFAULT) -> str:
    """Relative path of one shard: layer_03/part-00000-of-00004.tfrecord (mlp_out/layer_03/... for other hooks)."""
    return f"{layer_dirname(layer, hook)}/part-{shard:05d}-of-{num_shards:05d}{COMPRESSION_SUFFIX[compression]}"


def compression_of(path: str) -> str:
    return "gzip" if path.endswith(".gz") else "none"


# ----------------------------------------------------------------------------- varints


def _varint_encode(values: np.ndarray) -> bytes:
    """Protobuf varints of non-negative integers, vectorised: [n] -> bytes."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return b""
    shifts = np.arange(10, dtype=np.uint64) * np.uint64(7)
    groups = (v[:, None] >> shifts[None, :]) & np.uint64(0x7F)  # [n, 10] 7-bit groups
    bitlen = np.zeros(v.shape, dtype=np.int64)
    nz = v > 0
    bitlen[nz] = np.floor(np.log2(v[nz].astype(np.float64))).astype(np.int64) + 1
    # float log2 can be off by one near 2**k for huge values; correct it exactly.
    too_small = (bitlen < 64) & (v >= (np.uint64(1) << np.minimum(bitlen, 63).astype(np.uint64)))
    bitlen[too_small & nz] += 1
    nbytes = np.maximum(1, (bitlen + 6) // 7)  # [n]
    k = np.arange(10)[None, :]
    keep = k < nbytes[:, None]
    cont = (k < (nbytes[:, None] - 1)).astype(np.uint64) << np.uint64(7)
    return (groups | cont)[keep].astype(np.uint8).tobytes()


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


def _len_field(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


# ----------------------------------------------------------------------------- Example


def _feature_entry(key: str, feature: bytes) -> bytes:
    return _len_field(1, _len_field(1, key.encode()) + _len_field(2, feature))


def encode_example(activations: np.ndarray, **int_features: np.ndarray) -> bytes:
    """tf.train.Example bytes for one row: activations [n, H] (little-endian) + int64 lists.

    int_features are the SPEC's token_ids, doc_index, token_index and position, each [n].
    """
    acts = np.ascontiguousarray(activations)
    if acts.dtype.byteorder == ">":
        acts = acts.astype(acts.dtype.newbyteorder("<"))
    entries = [_feature_entry(ACTIVATIONS, _len_field(1, _len_field(1, acts.tobytes())))]
    for key in INT_FEATURES:
        packed = _len_field(1, _varint_encode(int_features[key]))
        entries.append(_feature_entry(key, _len_field(3, packed)))
    return _len_field(1, b"".join(entries))


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


def decode_example(data: bytes) -> dict[str, object]:
    """Inverse of encode_example: {'activations': bytes, 'token_ids': int64 [n], ...}.

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
                    out[key] = bytes(values[0]) if values else b""
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
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def iter_records(stream: BinaryIO, check_crc: bool = True) -> Iterator[bytes]:
    """TFRecord payloads of an (already decompressed) stream; ValueError on corruption."""
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise ValueError("truncated record header")
        (length,) = struct.unpack("<Q", header[:8])
        if check_crc and struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
            raise ValueError("length CRC mismatch")
        data = stream.read(length)
        footer = stream.read(4)
        if len(data) < length or len(footer) < 4:
            raise ValueError("truncated record")
        if check_crc and struct.unpack("<I", footer)[0] != _masked_crc(data):
            raise ValueError("data CRC mismatch")
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
    """

    def __init__(self, path: str, compression: str = "none"):
        self.path = path
        self.compression = compression
        self._sha = hashlib.sha256()
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

    def close(self) -> dict:
        if self._out is not self._hashing:
            self._out.close()  # writes the gzip trailer through the hashing writer
        self._file.commit()
        return {"records": self.records, "tokens": self.tokens, "bytes": self.bytes, "sha256": self._sha.hexdigest()}


class _HashingWriter:
    """Passes bytes to the file and into the owner's sha256 and byte count."""

    def __init__(self, raw, owner: ShardWriter):
        self._raw, self._owner = raw, owner

    def write(self, data) -> int:
        self._raw.write(data)
        self._owner._sha.update(data)
        self._owner.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()


def describe_shard(path: str) -> dict:
    """Recount a shard from its bytes: records, tokens, bytes and sha256 (CRC-checked)."""
    sha, size = fileio.sha256_file(path)
    records = tokens = 0
    for data in read_shard(path):
        records += 1
        tokens += len(decode_example(data)["token_ids"])
    return {"records": records, "tokens": tokens, "bytes": size, "sha256": sha}
