"""`python -m llm_activations validate OUT`: check every shard of a dataset against metadata.json.

Per file, in one streaming pass: it exists; its size and sha256 match its `shards` entry; every
TFRecord's length and data CRC32C are right; every record decodes as an Example with docs/FORMAT.md's
features, equally long int64 lists and exactly tokens x width x dtype-size activation bytes
(width: hidden_size, or the hook's hook_widths entry); the records and tokens counted match the
entry; no stored value is inf or nan (float16 overflow; tokens holding one are counted per file, and
per hook and layer in the summary). Per hook and layer: the files listed under `files` and the `shards` entries agree, and the
tokens and records add up to `counts`.

Exit 0 when all is well; 1 naming each bad file (and the record index when known); 2 (one line,
no traceback) for a folder that is not a dataset or lists paths that escape it.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llm_activations.argtypes import integer
import numpy as np

from llm_activations.format import fileio
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format import records
from llm_activations.format.dtypes import numpy_dtype


@dataclass
class FileReport:
    path: str  # relative to the dataset folder
    layer: int
    hook: str = hk.DEFAULT
    records: int = 0
    tokens: int = 0
    bytes: int = 0
    nonfinite: int = 0  # tokens with an inf or nan value
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_file(root: str, entry: dict, dtype, hidden_size: int) -> FileReport:
    """Validate one shard against its metadata entry; problems are collected, never raised."""
    rel = entry["path"]
    report = FileReport(rel, int(entry.get("layer", -1)), md.shard_hook(entry))
    path = md.shard_path(root, rel)
    raw = fileio.open_read(path) if fileio.exists(path) else None
    if raw is None:
        report.problems.append("missing file")
        return report
    hashing = fileio.HashingReader(raw)
    buffered = io.BufferedReader(hashing, buffer_size=1 << 22)
    stream = gzip.GzipFile(fileobj=buffered, mode="rb") if records.compression_of(rel) == "gzip" else buffered
    complete = False
    try:
        for index, data in enumerate(records.iter_records(stream, check_crc=True)):
            report.records += 1
            try:
                ex = records.decode_example(data)
                acts = records.decode_activations(ex, dtype, hidden_size)
                lengths = {k: len(ex[k]) for k in records.INT_FEATURES}
                if len(set(lengths.values())) != 1:
                    raise ValueError(f"feature lengths differ: {lengths}")
                report.tokens += acts.shape[0]
                report.nonfinite += int((~np.isfinite(acts)).any(axis=1).sum())
            except ValueError as e:
                report.problems.append(f"record {index}: undecodable ({e})")
                if len(report.problems) >= 5:
                    report.problems.append("(stopped after 5 problems)")
                    break
        else:
            complete = True
        buffered.read()  # bytes after the gzip stream, if any, belong to the hash too
        hashing.drain()
    except (ValueError, OSError, EOFError) as e:  # CRC / truncation / bad gzip
        report.problems.append(f"record {report.records}: {e}")
        hashing.drain()
    finally:
        stream.close()
    report.bytes = hashing.size
    if report.nonfinite:
        report.problems.append(f"{report.nonfinite} tokens hold inf or nan values"
                               + (" (float16 overflow: extract with --dtype bfloat16)" if dtype == np.float16 else ""))
    counted = (("bytes", report.bytes),) + ((("records", report.records), ("tokens", report.tokens)) if complete else ())
    for key, got in counted:  # record and token counts only mean something for a fully read file
        if key in entry and int(entry[key]) != got:
            report.problems.append(f"{key}: metadata says {entry[key]}, file has {got}")
    if entry.get("sha256") and hashing.sha.hexdigest() != entry["sha256"]:
        report.problems.append("sha256 mismatch")
    return report


def validate(root: str, workers: int = 4) -> tuple[list[FileReport], list[str]]:
    """(per-file reports, dataset-level problems). DatasetError for folders tools must refuse."""
    meta = md.read_metadata(root)
    dtype = numpy_dtype(meta["dtype"])
    problems: list[str] = []
    entries = {e["path"]: e for e in meta.get("shards", [])}
    listed = set()
    for key, files in meta.get("files", {}).items():
        hook, layer = hk.parse_key(key)
        for rel in files:
            md.shard_path(root, rel)  # refuse escaping paths (DatasetError -> exit 2)
            listed.add(rel)
            if rel not in entries:
                problems.append(f"{rel}: listed under files[{key}] but has no shards entry")
            elif (md.shard_hook(entries[rel]), int(entries[rel].get("layer", -1))) != (hook, layer):
                problems.append(f"{rel}: listed under files[{key}] but its shards entry says hook "
                                f"{md.shard_hook(entries[rel])} layer {entries[rel].get('layer')}")
    for rel in entries:
        if rel not in listed:
            problems.append(f"{rel}: has a shards entry but is not listed under files")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reports = list(pool.map(lambda e: check_file(root, e, dtype, md.hook_width(meta, md.shard_hook(e))),
                                entries.values()))
    counts = meta.get("counts", {})
    for key in meta.get("files", {}):
        hook, layer = hk.parse_key(key)
        mine = [r for r in reports if (r.hook, r.layer) == (hook, layer)]
        bad_tokens = sum(r.nonfinite for r in mine)
        if bad_tokens:
            problems.append(f"{hook} layer {layer}: {bad_tokens} of {sum(r.tokens for r in mine)} tokens hold inf or nan")
        for what, count_key in (("tokens", "tokens"), ("records", "sequences")):
            if count_key in counts and all(r.ok for r in mine):
                total = sum(getattr(r, what) for r in mine)
                if total != int(counts[count_key]):
                    problems.append(f"{hook} layer {layer}: files hold {total} {what}, counts.{count_key} says {counts[count_key]}")
    return reports, problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="dataset folder (local path or gs://...)")
    parser.add_argument("--workers", type=integer(1), default=min(8, os.cpu_count() or 1), help="files checked in parallel")


def run(args: argparse.Namespace) -> int:
    reports, problems = validate(args.out, args.workers)
    bad = [r for r in reports if not r.ok]
    for r in bad:
        print(f"BAD {r.path}: {'; '.join(r.problems)}")
    for p in problems:
        print(f"BAD {p}")
    total_bytes = sum(r.bytes for r in reports)
    print(
        f"{args.out}: {len(reports)} files, {sum(r.records for r in reports):,} records, "
        f"{sum(r.tokens for r in reports):,} tokens (all hooks and layers), {total_bytes / 2**20:,.1f} MiB checked: "
        + ("all good" if not bad and not problems else f"{len(bad)} bad files, {len(problems)} other problems"),
        file=sys.stdout,
    )
    return 0 if not bad and not problems else 1
