"""`merge`: several host datasets (independent-host mode) -> one dataset, exactly as one run would be.

Each host of a fleet runs `extract --num-hosts N --host-index I` over a disjoint, contiguous
doc_index range of the same input and writes a complete dataset folder. This command checks that
the folders are shards of one extraction (same model, tokenizer, input, layers, shapes, dtypes,
format, hooks) over disjoint doc_index ranges, then writes one metadata.json whose counts are the
sums, whose per-hook, per-layer statistics are the exact parallel merge of the hosts' Moments (stats.py), and
whose files are the hosts' files:

* referenced in place (paths relative to OUT) when a host folder lies inside OUT, e.g.
  OUT/host-00003/layer_07/part-00000-of-00016.tfrecord; nothing is moved or rewritten;
* otherwise copied byte for byte to OUT/host-IIIII/... and checked against the shard's sha256.

Records are never rewritten: doc_index is already global, so no renumbering is needed.
Writing into OUT follows rewrite.rewriting: every check runs first, then an old metadata.json in
OUT is removed before the first file is copied, and the new one is written last, so OUT is a
finished dataset only if everything succeeded (a failed merge --overwrite leaves no dataset, never
old metadata over new shards). A host file that is missing or not what its metadata says is
CorruptData (exit 1); inputs that cannot be merged are a UsageError (exit 2).
"""

from __future__ import annotations

import argparse
import os
import posixpath

from llm_activations.format import fileio
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format import names
from llm_activations.errors import CorruptData, DatasetError, UsageError
from llm_activations.format.rewrite import rewriting
from llm_activations.format.stats import Moments, merge_all

# Settings every host of one extraction must share: (label in messages, getter).
_SAME = (
    ("format_version", lambda m: m.get("format_version")),
    ("model.name_or_path", lambda m: m["model"].get("name_or_path")),
    ("model.architecture", lambda m: m["model"].get("architecture")),
    ("model.config", lambda m: m["model"].get("config")),
    ("model.num_layers", lambda m: m["model"].get("num_layers")),
    ("tokenizer", lambda m: m.get("tokenizer")),
    ("input.patterns", lambda m: m.get("input", {}).get("patterns")),
    ("input.text_field", lambda m: m.get("input", {}).get("text_field")),
    ("input.max_docs", lambda m: m.get("input", {}).get("max_docs")),
    ("input.num_hosts", lambda m: m.get("input", {}).get("num_hosts")),
    ("extraction.layers", lambda m: sorted(m["extraction"]["layers"])),
    ("extraction.hooks", lambda m: md.hooks_of(m)),
    ("hook_widths", lambda m: m.get("hook_widths")),
    ("extraction.seq_len", lambda m: m["extraction"].get("seq_len")),
    ("extraction.batch_size", lambda m: m["extraction"].get("batch_size")),
    ("extraction.mode", lambda m: m["extraction"].get("mode")),
    ("extraction.compute_dtype", lambda m: m["extraction"].get("compute_dtype")),
    ("dtype", lambda m: m.get("dtype")),
    ("hidden_size", lambda m: m.get("hidden_size")),
    ("compression", lambda m: m.get("compression", "none")),
)
_MAX_SHOWN = 80  # long values (a model config) are cut in messages, which must stay one line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IN", help="host dataset folders (local or gs://...)")
    parser.add_argument("--output", required=True, metavar="OUT", help="merged dataset folder")
    parser.add_argument(
        "--copy",
        action="store_true",
        help="copy every shard into OUT even when a host folder lies inside OUT (default: reference it in place)",
    )
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty OUT")


def run(args: argparse.Namespace) -> int:
    meta = merge_datasets(args.inputs, args.output, copy=args.copy, overwrite=args.overwrite)
    m = meta["merge"]
    counts = meta["counts"]
    print(
        f"merged {len(m['inputs'])} host folders into {args.output}: {counts['documents']} documents, "
        f"{counts['tokens']} tokens per layer, {len(meta['shards'])} files "
        f"({m['copied_files']} copied, {len(meta['shards']) - m['copied_files']} in place)"
        + ("" if m["complete"] else "; NOTE: not every host of the split is present")
    )
    return 0


# ----------------------------------------------------------------------------- merging


def merge_datasets(inputs: list[str], output: str, *, copy: bool = False, overwrite: bool = False) -> dict:
    """Merge host dataset folders into `output`; returns the metadata written (UsageError on bad input)."""
    if not inputs:
        raise UsageError("merge needs at least one input folder")
    metas = [md.read_metadata(root) for root in inputs]
    _check_consistent(inputs, metas)
    order = sorted(range(len(inputs)), key=lambda i: _sort_key(metas[i], i))
    inputs, metas = [inputs[i] for i in order], [metas[i] for i in order]
    ranges = _check_disjoint(inputs, metas)

    inside = [_inside(root, output) for root in inputs]
    for root, rel in zip(inputs, inside):
        if rel == ".":
            raise UsageError(f"input {root} is the output folder itself; merge into a new folder (it may contain the inputs)")
    prefixes = [None if copy else rel for rel in inside]
    dests = _copy_destinations(metas, prefixes, inside)
    _check_output(output, inside, overwrite)

    for root, meta, prefix in zip(inputs, metas, prefixes):  # every check before the first copy
        for paths in meta["files"].values():
            for p in paths:
                md.shard_path(root, p)  # refuses paths that escape the host folder
        if prefix is not None:
            for shard in meta["shards"]:
                _check_in_place(md.shard_path(root, shard["path"]), shard)

    shards, copied = [], 0
    with rewriting(output) as publish:  # OUT is no dataset from here until publish
        for root, meta, prefix, dest in zip(inputs, metas, prefixes, dests):
            base = prefix if prefix is not None else dest
            for shard in meta["shards"]:
                new_path = posixpath.join(base, posixpath.normpath(shard["path"]))
                if prefix is None:
                    _copy_verified(md.shard_path(root, shard["path"]), fileio.join(output, new_path), shard)
                    copied += 1
                shards.append({**shard, "path": new_path})
            if prefix is None:
                _copy_tree(fileio.join(root, names.REJECTED_DIR), fileio.join(output, dest, names.REJECTED_DIR))
        merged = _merged_metadata(inputs, metas, prefixes, dests, ranges, shards, copied)
        publish(merged)  # last: OUT is a finished dataset only now
    return merged


def _sort_key(meta: dict, i: int):
    inp = meta.get("input", {})
    rng = inp.get("doc_index_range")
    return (rng[0] if rng else -1, inp.get("host_index", -1), i)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _check_consistent(inputs: list[str], metas: list[dict]) -> None:
    for label, get in _SAME:
        try:
            values = [get(m) for m in metas]
        except (KeyError, TypeError):
            raise DatasetError(f"a host folder's metadata.json lacks {label}; is it an llm-activations dataset?") from None
        for root, value in zip(inputs[1:], values[1:]):
            if value != values[0]:
                raise UsageError(
                    f"inputs disagree on {label}: {inputs[0]} has {_show(values[0])}, {root} has {_show(value)}; "
                    "merge only host folders of one extraction (same model, input, layers and settings)"
                )
    for root, meta in zip(inputs, metas):
        layers = sorted(meta["extraction"]["layers"])
        keys = sorted(hk.key(h, layer) for h in md.hooks_of(meta) for layer in layers)
        if sorted(meta["files"]) != keys or any(k not in meta.get("stats", {}) for k in keys):
            raise DatasetError(f"{root}: metadata.json files/stats do not cover extraction hooks x layers {keys}")


def _check_disjoint(inputs: list[str], metas: list[dict]) -> list[list[int] | None]:
    """Host shares must not overlap.

    File inputs are split into contiguous doc_index ranges, which must not overlap. A streaming
    hf:// input has no known length, so its hosts share one range and take every num_hosts-th
    record from it (record i goes to host i % num_hosts): disjoint exactly when the host indices
    are distinct. Without ranges, distinct host indices of one split are the only evidence.
    """
    ranges = [m.get("input", {}).get("doc_index_range") for m in metas]
    hosts = [m.get("input", {}).get("host_index") for m in metas]
    interleaved = len(metas) > 1 and all(r is not None and r == ranges[0] for r in ranges)
    if all(r is not None for r in ranges) and not interleaved:
        for (a, ra), (b, rb) in zip(zip(inputs, ranges), zip(inputs[1:], ranges[1:])):
            if rb[0] < ra[1]:  # sorted by start, so overlapping neighbours are enough to look at
                raise UsageError(
                    f"doc_index ranges overlap: {a} has [{ra[0]}, {ra[1]}) and {b} has [{rb[0]}, {rb[1]}); "
                    "each host folder may be merged once, and hosts must come from one --num-hosts split"
                )
        return ranges
    if len(metas) > 1 and (None in hosts or len(set(hosts)) != len(hosts)):
        raise UsageError(
            f"inputs share records: {' and '.join(_same_host(inputs, hosts))} have the same host_index of "
            "one --num-hosts split (or none); each host folder may be merged once"
        )
    return [None] * len(metas) if not interleaved else ranges


def _same_host(inputs: list[str], hosts: list) -> list[str]:
    for i, h in enumerate(hosts):
        for j in range(i + 1, len(hosts)):
            if h is None or h == hosts[j]:
                return [inputs[i], inputs[j]]
    return inputs[:2]


def _inside(root: str, output: str) -> str | None:
    """root's path relative to output when root lies inside output, else None (never escapes)."""
    if fileio.is_url(root) != fileio.is_url(output):
        return None
    if fileio.is_url(root):
        r, o = root.rstrip("/"), output.rstrip("/")
    else:
        r, o = os.path.realpath(root), os.path.realpath(output)
    if r == o:
        return "."
    if not r.startswith(o.rstrip("/") + "/"):
        return None
    rel = posixpath.normpath(r[len(o.rstrip("/")) + 1 :])
    md.shard_path(output, rel)  # refuses anything that would escape OUT
    return rel


def _copy_destinations(metas: list[dict], prefixes: list[str | None], inside: list[str | None]) -> list[str | None]:
    """OUT/host-IIIII for each copied input; refuses clashes with each other and with inputs inside OUT."""
    dests, taken = [], {p.split("/")[0] for p in inside if p is not None}
    for k, (meta, prefix) in enumerate(zip(metas, prefixes)):
        if prefix is not None:
            dests.append(None)
            continue
        host = meta.get("input", {}).get("host_index")
        name = f"host-{host:05d}" if isinstance(host, int) else f"input-{k:05d}"
        if name in taken:
            raise UsageError(f"two inputs would be copied to {name}/ in the output (or it holds an input in place)")
        taken.add(name)
        dests.append(name)
    return dests


def _check_output(output: str, inside: list[str | None], overwrite: bool) -> None:
    if not fileio.is_url(output) and os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"--output {output} exists and is not a folder")
    holds_inputs = {p.split("/")[0] for p in inside if p is not None}
    other = [n for n in (posixpath.basename(e) for e in fileio.entries(output)) if n not in holds_inputs]
    if other and not overwrite:
        raise UsageError(
            f"--output {output} is not empty (it holds {', '.join(other[:3])}{', ...' if len(other) > 3 else ''} "
            "besides the input folders); pass --overwrite or choose another folder"
        )


def _copy_verified(src: str, dst: str, shard: dict) -> None:
    """Copy a shard byte for byte, hashing as it streams; refuse it if it is not what metadata says."""
    fout = fileio.open_for_commit(dst)
    try:
        with fileio.HashingReader(fileio.open_read(src)) as fin:
            while chunk := fin.read(1 << 22):
                fout.write(chunk)
    except FileNotFoundError:
        fout.abort()
        raise CorruptData(f"{src} is listed in its metadata.json but missing; the host folder is damaged") from None
    sha, size = fin.sha, fin.size
    if sha.hexdigest() != shard.get("sha256") or size != shard.get("bytes", size):
        fout.abort()
        raise CorruptData(
            f"{src} does not match its metadata.json (sha256 {sha.hexdigest()[:12]}... / {size} bytes, "
            f"expected {str(shard.get('sha256'))[:12]}... / {shard.get('bytes')} bytes); the host folder is corrupt"
        )
    fout.commit()


def _check_in_place(src: str, shard: dict) -> None:
    """A file referenced in place must exist with its recorded size (its sha256 is `validate`'s job)."""
    size = fileio.size(src)  # one metadata request on an object store, not a download
    if size is None:
        raise CorruptData(f"{src} is listed in its metadata.json but missing; the host folder is damaged")
    if "bytes" in shard and size != shard["bytes"]:
        raise CorruptData(f"{src} has {size} bytes, its metadata.json says {shard['bytes']}; the host folder is damaged")


def _copy_tree(src: str, dst: str) -> None:
    """Copy a host's rejected/ records along with its shards (absent folder: nothing to do)."""
    for rel in fileio.files_under(src):
        with fileio.open_read(fileio.join(src, rel)) as fin, fileio.create(fileio.join(dst, rel)) as fout:
            while chunk := fin.read(1 << 22):
                fout.write(chunk)


# ----------------------------------------------------------------------------- merged metadata


def _sum_counts(metas: list[dict]) -> dict:
    keys = list(dict.fromkeys(k for m in metas for k in m.get("counts", {})))
    out = {}
    for k in keys:
        values = [m.get("counts", {}).get(k, 0) for m in metas]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[k] = sum(values)
    return out


def _merged_stats(metas: list[dict]) -> dict:
    out = {}
    for hook in md.hooks_of(metas[0]):
        for layer in sorted(metas[0]["extraction"]["layers"]):
            key = hk.key(hook, layer)
            parts = []
            for m in metas:
                s = m["stats"][key]
                if not isinstance(s.get("mean"), list) or not isinstance(s.get("var"), list):
                    raise DatasetError(f"{hook} layer {layer} statistics are not inline in metadata.json; merge needs mean and var lists")
                parts.append(Moments.from_json(s))
            out[key] = merge_all(parts, md.hook_width(metas[0], hook)).to_json()
    return out


def _merged_run(metas: list[dict], counts: dict, bases: list[str], inputs: list[str]) -> dict:
    runs = [m.get("run", {}) for m in metas]
    wall = max((r.get("wall_seconds") or 0.0) for r in runs)
    starts = [r["start_time"] for r in runs if r.get("start_time")]
    ends = [r["end_time"] for r in runs if r.get("end_time")]
    runners = sorted({str(r.get("runner")) for r in runs if r.get("runner")})
    merged = {
        **runs[0],
        "runner": runners[0] if len(runners) == 1 else runners,
        "workers": sum(r.get("workers", 0) for r in runs),
        "compilations": sum(r.get("compilations", 0) for r in runs),
        # Hosts run side by side: the job took as long as its slowest host, and its throughput is
        # every token written over that time (not the sum of per-host rates, which overstates it
        # whenever hosts did not run exactly together).
        "wall_seconds": wall,
        "tokens_per_second": round(counts.get("tokens", 0) / wall, 1) if wall > 0 else None,
        "start_time": min(starts) if starts else None,
        "end_time": max(ends) if ends else None,
        "hosts": [
            {k: r.get(k) for k in _HOST_RUN_KEYS if k in r} for r in runs
        ],
    }
    if any("extract_seconds" in r for r in runs):
        merged["extract_seconds"] = sum(r.get("extract_seconds", 0.0) for r in runs)
    if any("rejected_files" in r for r in runs):
        merged["rejected_files"] = [
            _rebase(f, root, base) for r, root, base in zip(runs, inputs, bases) for f in r.get("rejected_files", [])
        ]
    return merged


_HOST_RUN_KEYS = ("runner", "workers", "compilations", "wall_seconds", "tokens_per_second", "extract_seconds",
                  "start_time", "end_time")


def _rebase(path: str, root: str, base: str) -> str:
    """A host's path (relative to its folder, or a URL inside it) as a path relative to OUT."""
    if fileio.is_url(path):
        prefix = root.rstrip("/") + "/"
        if not path.startswith(prefix):
            return path
        path = path[len(prefix) :]
    return posixpath.join(base, posixpath.normpath(path))


def _merged_input(metas: list[dict], ranges: list) -> dict:
    inp = dict(metas[0].get("input", {}))
    hosts = [m.get("input", {}).get("host_index") for m in metas]
    inp["host_index"] = None  # a merged dataset is no single host's share
    inp["host_indices"] = hosts
    if all(r is not None for r in ranges):
        if len(ranges) > 1 and all(r == ranges[0] for r in ranges):  # interleaved hf:// split: one shared range
            inp["doc_index_ranges"] = [list(ranges[0])]
            inp["doc_index_range"] = list(ranges[0])
        else:
            contiguous = all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            inp["doc_index_ranges"] = [list(r) for r in ranges]
            inp["doc_index_range"] = [ranges[0][0], ranges[-1][1]] if contiguous else None
    return inp


def _merged_metadata(inputs, metas, prefixes, dests, ranges, shards, copied) -> dict:
    first = metas[0]
    counts = _sum_counts(metas)
    inp = _merged_input(metas, ranges)
    num_hosts = inp.get("num_hosts")
    hosts = inp["host_indices"]
    # Every host of the split is here, and (when ranges are known) their shares leave no gap.
    complete = (
        isinstance(num_hosts, int)
        and sorted(h for h in hosts if h is not None) == list(range(num_hosts))
        and ("doc_index_ranges" not in inp or inp["doc_index_range"] is not None)
    )
    extraction = dict(first["extraction"])
    # Hosts may differ in chips and file counts: keep the per-host values beside the totals.
    extraction["meshes"] = [m["extraction"].get("mesh") for m in metas]
    first_key = (md.hooks_of(first)[0], first["extraction"]["layers"][0])
    # files per hook and layer, all hosts
    extraction["num_shards"] = sum((md.shard_hook(s), s["layer"]) == first_key for s in shards)
    extraction["num_shards_per_host"] = [m["extraction"].get("num_shards") for m in metas]
    return md.build_metadata(
        **{k: first[k] for k in ("model", "tokenizer", "dtype", "hidden_size", "compression")},
        input=inp,
        extraction=extraction,
        shards=shards,
        counts=counts,
        stats=_merged_stats(metas),
        hook_widths=first.get("hook_widths"),
        run=_merged_run(metas, counts, [p if p is not None else d for p, d in zip(prefixes, dests)], inputs),
        merge={
            "inputs": [
                {"source": root, "path": p if p is not None else d, "in_place": p is not None, "host_index": h}
                for root, p, d, h in zip(inputs, prefixes, dests, hosts)
            ],
            "copied_files": copied,
            "complete": complete,
        },
    )
