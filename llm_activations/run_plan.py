"""The run plan: everything `extract` decides before it writes anything, built once on the launcher
and passed whole (to the output folder's resume plan, the Beam graph and the metadata).

Inputs are scanned (inputs.plan_sources, cached per file), this host's share of the doc_index is
found, the share is cut into work units, and the fingerprint that a unit manifest must carry to be
kept by --resume is computed from everything that determines a unit's records.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from llm_activations import inputs
from llm_activations.errors import UsageError
from llm_activations.format import hooks as hk
from llm_activations.format import manifests


@dataclass(frozen=True)
class RunPlan:
    cfg: object  # options.ExtractConfig, checked and resolved (options.check_config)
    sources: tuple  # inputs.SourceFile, in doc_index order
    host_docs: tuple  # this host's doc_index range [start, stop)
    units: tuple  # inputs.WorkUnit
    fingerprint: str  # manifests.fingerprint(unit_settings(...)): what --resume compares

    @property
    def num_units(self) -> int:
        return len(self.units)

    @classmethod
    def build(cls, cfg, hf: dict) -> "RunPlan":
        """hf: the checkpoint's config.json (part of the fingerprint)."""
        sources, host_docs, units = plan(cfg)
        fp = manifests.fingerprint(unit_settings(cfg, hf, sources, len(units), host_docs))
        return cls(cfg, tuple(sources), tuple(host_docs), tuple(units), fp)


def plan(cfg):
    """Sources, this host's doc_index range, and the work units."""
    sources = inputs.plan_sources(list(cfg.inputs), cfg.text_field, inputs.ScanCache.default())
    if sources[0].kind == "hf":
        return plan_hf(cfg, sources[0])
    total = sum(s.num_records for s in sources)
    if cfg.max_docs:
        total = min(total, cfg.max_docs)
    # hosts' shares begin where reading can begin, as units do (every host snaps the same edges);
    # the run's end stays where --max-docs puts it, even inside a row group or a compressed file
    start, stop = (x if x >= total else min(total, inputs.snap(x, sources))
                   for x in inputs.host_range(total, cfg.num_hosts, cfg.host_index))
    if not cfg.num_shards:  # the planner's choice: fewer, larger units rather than an empty one
        units = inputs.plan_units(sources, start=start, stop=stop, keep_empty=False,
                                  num_units=inputs.auto_num_units(stop - start, cfg.docs_per_unit))
        return sources, (start, stop), units
    units = inputs.plan_units(sources, start=start, stop=stop, num_units=cfg.num_shards)
    empty = sum(u.start == u.stop for u in units)
    if empty:
        print(f"note: {empty} of --num-shards {cfg.num_shards} units hold no records and write empty shards (a unit "
              "begins only at a record, a parquet row group or a compressed or .txt file, so that no input is read "
              "twice); fewer --num-shards, smaller parquet row groups or more, smaller files fill them", file=sys.stderr)
    return sources, (start, stop), units


def plan_hf(cfg, src):
    """An hf:// split: units (and hosts) over its file shards, or one stream when it has none."""
    if src.num_shards and not cfg.max_docs:
        first, stop = inputs.host_range(src.num_shards, cfg.num_hosts, cfg.host_index)
        units = inputs.plan_hf_units(src, first=first, stop=stop, num_units=cfg.num_shards or max(1, stop - first))
        return [src], (first * inputs.HF_SHARD_STRIDE, stop * inputs.HF_SHARD_STRIDE), units
    if cfg.num_shards > 1:
        raise UsageError(f"--num-shards {cfg.num_shards}: an hf:// split is read as one stream into one file per layer; "
                         "leave --num-shards out, or save the split as parquet files to shard it")
    why = "--max-docs counts records in split order" if src.num_shards else "the split exposes fewer than 2 file shards"
    print(f"note: {src.path} is read as one stream into one unit ({why}); each host reads every record "
          "and keeps its share", file=sys.stderr)
    stop = cfg.max_docs if cfg.max_docs else -1
    return [src], (0, stop), [inputs.WorkUnit(0, 0, stop, ((src, 0, stop),))]


def unit_settings(cfg, hf: dict, sources, num_units: int, host_docs) -> dict:
    """Everything that determines the records of a unit: its manifest's fingerprint covers it."""
    keys = ("model", "text_field", "layers", "seq_len", "batch_size", "mode", "dtype", "compute_dtype", "compression")
    settings = {**{k: getattr(cfg, k) for k in keys}, "config": hf, "num_units": num_units, "host_docs": list(host_docs),
                "num_hosts": cfg.num_hosts, "sources": [(s.path, s.num_records) for s in sources]}
    if tuple(cfg.hooks) != hk.DEFAULT_HOOKS:  # resid_post alone keeps its fingerprint: older runs stay resumable
        settings["hooks"] = list(cfg.hooks)
    if cfg.prepend_token_id is not None:  # likewise for runs without --prepend
        settings["prepend_token_id"] = cfg.prepend_token_id
    return settings


