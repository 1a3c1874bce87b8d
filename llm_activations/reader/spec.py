"""What a reader takes from metadata.json: files, schema, per-shard sizes, scaling and the norm policy."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from llm_activations.errors import DatasetError
from llm_activations.format import hooks as hk
from llm_activations.format import metadata as md
from llm_activations.format import norms
from llm_activations.format import records
from llm_activations.format.dtypes import numpy_dtype

log = logging.getLogger("llm_activations.reader")


@dataclass(frozen=True)
class ShardInfo:
    """One shard as metadata lists it: what a pass over it must find (None: not recorded, not checked)."""

    path: str  # full path
    records: int | None
    bytes: int | None  # the file's size on disk (compressed size for gzip)


@dataclass(frozen=True)
class LayerSpec:
    """What a reader needs to know about one hook of one layer of a dataset, taken from metadata.json."""

    root: str
    layer: int
    files: tuple[str, ...]  # full paths, metadata order
    dtype: str
    hidden_size: int  # values per token of this hook (heads x head_dim for z)
    compression: str
    scaling_factor: float | None  # over all stored tokens (metadata stats)
    tokens: int
    records: int
    hook: str = hk.DEFAULT
    shards: tuple[ShardInfo, ...] = ()  # one per file, in files order
    norm_histogram: dict | None = None  # stats[key]["norms"] (NormHistogram.to_json); None in older datasets

    def record_buffer(self, shuffle_buffer: int) -> int:
        """Records in the record-level shuffle buffer: about shuffle_buffer tokens' worth, >= 2."""
        per_record = self.tokens / self.records if self.records and self.tokens else 1
        return max(2, round(shuffle_buffer / per_record))

    @property
    def bytes_per_token(self) -> int:
        return self.hidden_size * numpy_dtype(self.dtype).itemsize

    @property
    def key(self) -> str:
        return hk.key(self.hook, self.layer)


def layer_spec(path: str, layer: int, *, hook: str = hk.DEFAULT, read_text=None) -> LayerSpec:
    """Read and check metadata.json of the dataset at path and describe `hook` at `layer`."""
    meta = md.read_metadata(path, read_text=read_text)
    rels = md.layer_files(meta, layer, hook)
    files = tuple(md.shard_path(path, rel) for rel in rels)
    if not files:
        raise DatasetError(f"{path}: hook {hook} at layer {layer} has no shard files")
    numpy_dtype(meta["dtype"])  # refuse unknown dtypes here, in one line
    stats = meta.get("stats", {}).get(hk.key(hook, layer), {})
    listed = {s["path"]: s for s in meta.get("shards", [])}

    def info(rel: str, full: str) -> ShardInfo:
        s = listed.get(rel, {})
        return ShardInfo(full, _int_or_none(s.get("records")), _int_or_none(s.get("bytes")))

    return LayerSpec(
        root=path,
        layer=layer,
        hook=hook,
        files=files,
        dtype=meta["dtype"],
        hidden_size=md.hook_width(meta, hook),
        compression=meta.get("compression") or records.compression_of(files[0]),
        scaling_factor=stats.get("scaling_factor"),
        tokens=int(meta.get("counts", {}).get("tokens", 0)),
        records=int(meta.get("counts", {}).get("sequences", 0)),
        shards=tuple(info(rel, full) for rel, full in zip(rels, files)),
        norm_histogram=stats.get("norms"),
    )


def _int_or_none(v) -> int | None:
    return None if v is None else int(v)


@dataclass(frozen=True)
class Delivery:
    """What a pass delivers of one hook: the norm threshold (inf: every token) and the batch scale."""

    threshold: float
    scale: float | None  # None: values as stored
    policy: norms.NormPolicy | None  # None: the dataset has no norm histogram (or none was asked for)


_warned: set[str] = set()


def delivery(spec: LayerSpec, max_norm_ratio: float | None, normalize: bool) -> Delivery:
    """The massive-activation policy and scale of one hook (format/norms.py is the contract).

    With a histogram in metadata: drop tokens above policy.threshold, and normalize by the scale of
    the delivered tokens. Without one (datasets written before the histogram existed): keep every
    token and normalize by the all-token scaling_factor, saying so once per dataset and hook.
    """
    if spec.norm_histogram is None:
        if max_norm_ratio is not None and f"{spec.root}:{spec.key}" not in _warned:
            _warned.add(f"{spec.root}:{spec.key}")
            log.warning("%s: metadata has no norm histogram for %s at layer %d (written before this version): "
                        "max_norm_ratio is not applied, every token is delivered", spec.root, spec.hook, spec.layer)
        return Delivery(math.inf, _stored_scale(spec) if normalize else None, None)
    try:
        policy = norms.policy(norms.NormHistogram.from_json(spec.norm_histogram), max_norm_ratio)
    except ValueError as e:
        raise DatasetError(f"{spec.root}: stats[{spec.key!r}].norms: {e}") from None
    scale = None
    if normalize:
        scale = policy.scaling_factor(spec.hidden_size)
        if scale is None:
            raise DatasetError(f"{spec.root}: no token of {spec.hook} at layer {spec.layer} is delivered; cannot normalize")
    return Delivery(policy.threshold, scale, policy)


def _stored_scale(spec: LayerSpec) -> float:
    if not spec.scaling_factor:
        raise DatasetError(f"{spec.root}: metadata has no scaling_factor for {spec.hook} at layer {spec.layer}; cannot normalize")
    return float(spec.scaling_factor)
