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
from concurrent.futures import ThreadPoolExecutor

from llm_activations.format import fileio
from llm_activations.errors import UsageError
from llm_activations.format import hooks as hk
from llm_activations.format.fileio import join
from llm_activations.format.names import manifest_relpath, rejected_relpath
from llm_activations.format.stats import Moments, merge_all

COUNT_KEYS = ("documents", "rejected", "segments", "sequences", "batches", "tokens", "padding_tokens")


def fingerprint(settings: dict) -> str:
    """A short hash of everything that determines a unit's output (see pipeline.unit_settings)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


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
    """Write the manifest, last (its presence marks the unit finished), with each file's identity
    as stored ("identities": {path: fileio.Stat.identity}): --resume compares these and the sizes
    against one listing of the folder instead of reading the files back."""
    files = [s["path"] for s in manifest["shards"]] + ([manifest["rejected_file"]] if manifest.get("rejected_file") else [])
    stats = _each_remote(fileio.stat, [join(output, rel) for rel in files])
    manifest = {**manifest, "identities": {rel: st.identity for rel, st in zip(files, stats) if st is not None}}
    fileio.write_text_atomic(join(output, manifest_relpath(manifest["unit"], num_units)), json.dumps(manifest))


def write_rejected(output: str, unit: int, num_units: int, lines: list) -> str:
    """rejected/part-0000u-of-N.jsonl for one unit; returns its path relative to output."""
    rel = rejected_relpath(unit, num_units)
    fileio.write_text_atomic(join(output, rel), "".join(line + "\n" for line in lines))
    return rel


REQUIRED = ("unit", "doc_index_range", "fingerprint", "inputs", "counts", "shards", "rejected_file", "moments")


def parse_manifest(text: str | None, name: str) -> tuple[dict | None, str | None]:
    """(manifest, None), or (None, why it cannot be used): a truncated or incomplete manifest (a
    worker or a disk that died while writing it, an edit by hand) is not a finished unit."""
    if text is None:
        return None, "it disappeared while being read"
    try:
        manifest = json.loads(text)
    except ValueError:
        return None, "it is not valid JSON (truncated?)"
    if not isinstance(manifest, dict):
        return None, "it is not a JSON object"
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        return None, f"it lacks {', '.join(missing)}"
    shards = manifest["shards"]
    if (not isinstance(shards, list) or not all(isinstance(x, dict) and {"path", "bytes"} <= set(x) for x in shards)
            or not isinstance(manifest["counts"], dict) or not isinstance(manifest["moments"], dict)):
        return None, "its shards, counts or moments are malformed"
    if name != manifest_relpath(manifest["unit"], _num_units_of(name)).rsplit("/", 1)[-1]:
        return None, f"it describes unit {manifest['unit']}, not its file's"
    return manifest, None


def _num_units_of(name: str) -> int:
    try:
        return int(name.rsplit("-of-", 1)[1].split(".")[0])
    except (IndexError, ValueError):
        return -1


def read_manifests(output: str, fp: str, names: list[str]) -> tuple[dict, dict]:
    """({unit: manifest} of the finished units in output, {manifest relpath: why unusable}).

    names: the manifests' paths relative to output (from the caller's one listing); they are read
    in parallel, one request each. A manifest from another configuration is a UsageError (resuming
    would mix two extractions in one folder); a truncated or incomplete one is returned as unusable,
    so its unit is extracted again.
    """
    texts = _each_remote(_read_listed, [join(output, n) for n in names])
    found, unusable = {}, {}
    for rel, text in zip(names, texts):
        manifest, why = parse_manifest(text, rel.rsplit("/", 1)[-1])
        if manifest is None:
            unusable[rel] = why
            continue
        if manifest["fingerprint"] != fp:
            raise UsageError(f"--resume: {output} holds units extracted with other options, input or model "
                             f"({rel.rsplit('/', 1)[-1]}); rerun with the original options, or use --overwrite")
        found[manifest["unit"]] = manifest
    return found, unusable


def _each_remote(fn, paths: list[str]) -> list:
    """[fn(p) for p in paths]; on an object store 16 at a time, as a request's latency, not
    bandwidth, bounds a manifest read or a file's stat (a unit's shards, at its finish)."""
    if not paths or not fileio.is_url(paths[0]):
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(fn, paths))


def _read_listed(path: str) -> str | None:
    """The text of a file a listing just showed (no existence check first); None if it disappeared since."""
    try:
        with fileio.open_read(path) as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None


def stale_reason(output: str, manifest: dict, inputs: str, listing: dict, verify: bool = False) -> str | None:
    """Why a finished unit cannot be kept by --resume (None if it can): its input is no longer
    what it read (`inputs`, the unit's input fingerprint now), or a file it names is missing from
    `listing` ({relpath: fileio.Stat}, one listing of output) or differs from the size and identity
    its manifest recorded. No file is read, unless `verify` (--resume --verify) asks for each
    shard's sha256 too, or an older manifest recorded no identity."""
    if manifest.get("inputs") != inputs:
        return "its input changed since it was extracted"
    identities = manifest.get("identities")
    for shard in manifest["shards"]:
        st = listing.get(shard["path"])
        if st is None:
            return f"{shard['path']} is missing"
        if st.size != shard["bytes"]:
            return f"{shard['path']} differs from its manifest (size {st.size}, not {shard['bytes']})"
        if identities is not None and identities.get(shard["path"]) != st.identity:
            return f"{shard['path']} was rewritten since its unit finished ({st.identity or 'no identity'})"
        if (verify or identities is None) and fileio.sha256_file(join(output, shard["path"]))[0] != shard.get("sha256"):
            return f"{shard['path']} differs from its manifest (sha256)"
    if manifest.get("rejected_file") and manifest["rejected_file"] not in listing:
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
