"""Unit manifests: the durable record of one finished work unit, and what metadata.json is built from.

A worker writes OUT/_units/unit-00003-of-00016.json after the unit's shard files are complete
(renamed into place), so a manifest's presence proves the unit is done. It holds the unit's
doc_index range, counts, shard descriptions, rejected-records file and per-(hook, layer) Moments (float64,
JSON round-trips them exactly). The final metadata sums and merges manifests, which is what makes
`--resume` exact: units with a manifest from the same configuration are skipped, and their
manifests count as if the units had just run.
"""

from __future__ import annotations

import hashlib
import json

from llm_activations.format import fileio
from llm_activations.errors import UsageError
from llm_activations.format import hooks as hk
from llm_activations.format.fileio import join
from llm_activations.format.stats import Moments, merge_all

MANIFEST_DIR = "_units"
COUNT_KEYS = ("documents", "rejected", "segments", "sequences", "batches", "tokens", "padding_tokens")


def fingerprint(settings: dict) -> str:
    """A short hash of everything that determines a unit's output (see pipeline.unit_settings)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def manifest_relpath(unit: int, num_units: int) -> str:
    return f"{MANIFEST_DIR}/unit-{unit:05d}-of-{num_units:05d}.json"


def unit_manifest(unit, fp: str, counts: dict, shards: list, moments: dict, rejected_file: str | None,
                  run: dict | None = None) -> dict:
    """run: {"mesh", "compilations"} of the worker that made the unit, so that metadata written by a
    later --resume still says how the units were made."""
    return {
        "unit": unit.index,
        "doc_index_range": [unit.start, unit.stop],
        "fingerprint": fp,
        "inputs": unit.input_fingerprint(),
        "run": run or {},
        "counts": {k: int(counts.get(k, 0)) for k in COUNT_KEYS},
        "shards": shards,
        "rejected_file": rejected_file,
        # keyed like metadata `stats`: "<layer>" for resid_post, "<hook>/<layer>" for other hooks
        "moments": {hk.key(hook, layer): m.to_json() for (hook, layer), m in moments.items()},
    }


def write_manifest(output: str, manifest: dict, num_units: int) -> None:
    fileio.write_text_atomic(join(output, manifest_relpath(manifest["unit"], num_units)), json.dumps(manifest))


def write_rejected(output: str, unit: int, num_units: int, lines: list) -> str:
    """rejected/part-0000u-of-N.jsonl for one unit; returns its path relative to output."""
    rel = f"rejected/part-{unit:05d}-of-{num_units:05d}.jsonl"
    fileio.write_text_atomic(join(output, rel), "".join(line + "\n" for line in lines))
    return rel


def read_manifests(output: str, fp: str) -> dict:
    """{unit: manifest} of the finished units in output; UsageError if any came from another
    configuration (resuming would mix two extractions in one folder)."""
    found = {}
    for path in fileio.match([join(output, MANIFEST_DIR, "unit-*.json")]):
        with fileio.open_read(path) as f:  # match just listed it: no existence check needed
            manifest = json.loads(f.read())
        if manifest.get("fingerprint") != fp:
            raise UsageError(f"--resume: {output} holds units extracted with other options, input or model "
                             f"({path.rsplit('/', 1)[-1]}); rerun with the original options, or use --overwrite")
        found[manifest["unit"]] = manifest
    return found


def stale_reason(output: str, manifest: dict, inputs: str) -> str | None:
    """Why a finished unit cannot be kept by --resume (None if it can): its input is no longer
    byte-for-byte what it read (`inputs`, the unit's input fingerprint now), or a file it names is
    missing or differs from the sha256 and size its manifest recorded."""
    if manifest.get("inputs") != inputs:
        return "its input changed since it was extracted"
    for shard in manifest["shards"]:
        path = join(output, shard["path"])
        nbytes = fileio.size(path)  # one request: existence and size; a wrong size is never hashed
        if nbytes is None:
            return f"{shard['path']} is missing"
        if nbytes != shard["bytes"] or fileio.sha256_file(path)[0] != shard["sha256"]:
            return f"{shard['path']} differs from its manifest"
    if manifest.get("rejected_file") and not fileio.exists(join(output, manifest["rejected_file"])):
        return f"{manifest['rejected_file']} is missing"
    return None


def summarize(manifests: list, layers: list, hidden_size: int, hooks=hk.DEFAULT_HOOKS,
              widths: dict | None = None) -> dict:
    """counts, shards, stats and rejected files of a whole run from its unit manifests.

    stats has one entry per hook and layer (hooks.key); widths gives a hook's values per token
    where it is not hidden_size (z). Shards are ordered by hook (block order), layer, path.
    """
    manifests = sorted(manifests, key=lambda m: m["unit"])
    counts = {k: sum(m["counts"][k] for m in manifests) for k in COUNT_KEYS}
    shards = sorted((s for m in manifests for s in m["shards"]),
                    key=lambda s: (hk.HOOKS.index(s.get("hook", hk.DEFAULT)), s["layer"], s["path"]))
    stats = {}
    for hook in hooks:
        for layer in layers:
            k = hk.key(hook, layer)
            parts = [Moments.from_json(m["moments"][k]) for m in manifests if k in m["moments"]]
            stats[k] = merge_all(parts, (widths or {}).get(hook, hidden_size)).to_json()
    rejected = [m["rejected_file"] for m in manifests if m["rejected_file"]]
    return {"counts": counts, "shards": shards, "stats": stats, "rejected_files": rejected}
