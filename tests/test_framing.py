"""The zero-copy record framing (records.example_parts / frame_parts / int_features_tails /
ShardWriter.write_parts) gives exactly the bytes of the straightforward implementation it replaced,
kept here verbatim as the reference."""

from __future__ import annotations

import hashlib
import struct

import google_crc32c
import ml_dtypes
import numpy as np
import pytest

from llm_activations.format import records

# ----------------------------------------------------------------------------- the old implementation


def _old_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _old_varint_list(values) -> bytes:  # one value at a time: the definition, not vectorised
    return b"".join(_old_varint(int(v)) for v in np.asarray(values).reshape(-1))


def _old_len_field(field: int, payload: bytes) -> bytes:
    return _old_varint((field << 3) | 2) + _old_varint(len(payload)) + payload


def _old_feature_entry(key: str, feature: bytes) -> bytes:
    return _old_len_field(1, _old_len_field(1, key.encode()) + _old_len_field(2, feature))


def _old_encode_example(activations: np.ndarray, **ints) -> bytes:
    entries = [_old_feature_entry("activations", _old_len_field(1, _old_len_field(1, np.ascontiguousarray(activations).tobytes())))]
    for key in ("token_ids", "doc_index", "token_index", "position"):
        entries.append(_old_feature_entry(key, _old_len_field(3, _old_len_field(1, _old_varint_list(ints[key])))))
    return _old_len_field(1, b"".join(entries))


def _old_masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _old_frame_record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _old_masked_crc(header)) + data + struct.pack("<I", _old_masked_crc(data))


# ----------------------------------------------------------------------------- inputs


def _row(rng, n: int, hidden: int, dtype) -> tuple[np.ndarray, dict]:
    acts = rng.standard_normal((n, hidden)).astype(dtype)
    ints = {"token_ids": rng.integers(0, 152_000, n), "doc_index": rng.integers(0, 2**40, n),
            "token_index": np.arange(n) + int(rng.integers(0, 20_000)), "position": np.arange(n)}
    return acts, ints


# Sizes whose length fields cross varint widths: activation bytes of 126..130 and 16382..16386,
# and a 2**21-byte payload (a 3- to 4-byte varint in the outer fields).
SHAPES = [(1, 1), (63, 1), (64, 1), (65, 1), (8191, 1), (8192, 1), (8193, 1), (3, 7), (1024, 1024), (37, 896)]


@pytest.mark.parametrize("n,hidden", SHAPES)
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32])
def test_example_and_record_bytes_equal_the_old_implementation(n, hidden, dtype):
    rng = np.random.default_rng(n * 7 + hidden)
    acts, ints = _row(rng, n, hidden, dtype)
    old = _old_encode_example(acts, **ints)
    assert records.encode_example(acts, **ints) == old
    head, body, tail = records.example_parts(acts, records.int_features_tail(**ints))
    assert np.shares_memory(body, acts)  # the activations are not copied
    pieces = records.frame_parts(head, body, tail)
    assert b"".join(bytes(p) for p in pieces) == _old_frame_record(old) == records.frame_record(old)


def test_varints_of_every_width_match_the_definition():
    values = np.array([0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**35, 2**49, 2**56 - 1, 2**62, 2**63 - 1], np.int64)
    assert records._varint_encode(values) == _old_varint_list(values)
    np.testing.assert_array_equal(records._varint_decode(records._varint_encode(values)), values)
    for v in values.tolist() + [2**64 - 1]:
        assert records._varint_len(v) == len(_old_varint(v))


def test_batch_tails_equal_the_per_row_tails():
    rng = np.random.default_rng(0)
    B, T = 5, 300
    lengths = np.array([300, 17, 0, 128, 0])  # full, partial and empty rows, empty last
    feats = {"token_ids": rng.integers(0, 2**17, (B, T)).astype(np.int32),
             "doc_index": rng.integers(0, 2**40, (B, T)), "token_index": rng.integers(0, 2**20, (B, T)),
             "position": np.tile(np.arange(T, dtype=np.int32), (B, 1))}
    tails = records.int_features_tails(lengths, **feats)
    assert len(tails) == B
    for r, n in enumerate(lengths):
        expected = records.int_features_tail(**{k: v[r, :n] for k, v in feats.items()})
        assert tails[r] == expected
        full = _old_encode_example(np.zeros((n, 2), np.float32), **{k: v[r, :n] for k, v in feats.items()})
        assert full.endswith(tails[r])


@pytest.mark.parametrize("compression", ["none", "gzip"])
@pytest.mark.parametrize("background", [False, True])
def test_shard_writer_parts_write_the_same_file(tmp_path, compression, background):
    rng = np.random.default_rng(1)
    rows = [_row(rng, n, 96, ml_dtypes.bfloat16) for n in (5, 700, 1, 2048)]
    suffix = records.COMPRESSION_SUFFIX[compression]
    old = records.ShardWriter(str(tmp_path / f"old{suffix}"), compression)
    new = records.ShardWriter(str(tmp_path / f"new{suffix}"), compression, hash_in_background=background)
    for acts, ints in rows:
        old.write(_old_encode_example(acts, **ints), len(acts))
        new.write_parts(records.frame_parts(*records.example_parts(acts, records.int_features_tail(**ints))), len(acts))
    a, b = old.close(), new.close()
    assert a == b and a["records"] == 4 and a["tokens"] == 2754
    data = (tmp_path / f"new{suffix}").read_bytes()
    assert data == (tmp_path / f"old{suffix}").read_bytes()
    assert hashlib.sha256(data).hexdigest() == b["sha256"] and len(data) == b["bytes"]
    got = [records.decode_example(d) for d in records.read_shard(str(tmp_path / f"new{suffix}"))]
    np.testing.assert_array_equal(got[1]["doc_index"], rows[1][1]["doc_index"])
