"""metadata.json: the dataset's schema and table of contents, shared by writer, reader and tools.

A folder is a finished dataset only when metadata.json exists (it is written last). Every tool
reads it through read_metadata, which refuses unknown formats in one line, and resolves shard
paths through shard_path, which refuses paths that escape the dataset folder.
"""

from __future__ import annotations

import json
import posixpath

from llm_activations.format import fileio
from llm_activations.errors import DatasetError

FORMAT = "llm-activations"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"


def join(root: str, *parts: str) -> str:
    """Join for local paths and URLs alike (gs://bucket/x + a/b)."""
    return posixpath.join(root.rstrip("/") or "/", *parts)


def read_metadata(root: str, read_text=None) -> dict:
    """The parsed metadata.json of a dataset folder, validated; DatasetError otherwise.

    read_text(path) -> str | None (None: no such file) replaces the default reader (local files and
    Beam filesystems), e.g. with tf.io.gfile in processes that read through TensorFlow.
    """
    text = (read_text or fileio.read_text)(join(root, METADATA_FILE))
    if text is None:
        if fileio.exists(root):
            raise DatasetError(f"{root} is a file; give an llm-activations dataset folder (it has {METADATA_FILE})")
        # what an extraction writes before metadata.json (manifests.MANIFEST_DIR is "_units")
        if not any(posixpath.basename(p.rstrip("/")).startswith(("_units", "layer_", "rejected")) for p in fileio.entries(root)):
            raise DatasetError(f"{root} has no {METADATA_FILE}: it is not a finished llm-activations dataset "
                               "(nor the folder of an interrupted extraction)")
        raise DatasetError(
            f"{root} has no {METADATA_FILE}: it is not a finished llm-activations dataset (its extraction did not "
            "complete: run the same extract command again with --resume to finish it, or with --overwrite to start over)"
        )
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{join(root, METADATA_FILE)} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{root}: metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{root}: format_version {meta.get('format_version')!r} is not supported by this version of "
            f"llm_activations (it reads version {FORMAT_VERSION}); upgrade the package"
        )
    for shard in meta.get("shards", []):
        shard_path(root, shard["path"])  # refuse escaping paths before any tool opens one
    return meta


def shard_path(root: str, relpath: str) -> str:
    """Absolute path of a shard listed in metadata; refuses paths that leave the dataset folder."""
    norm = posixpath.normpath(relpath)
    if "://" in relpath or norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise DatasetError(f"metadata lists {relpath!r}, which escapes the dataset folder {root}; refusing it")
    return join(root, norm)


def layer_files(meta: dict, layer: int) -> list[str]:
    files = meta["files"].get(str(layer))
    if files is None:
        raise DatasetError(f"layer {layer} is not in this dataset; it has layers {sorted(int(k) for k in meta['files'])}")
    return files


def write_metadata(root: str, meta: dict) -> str:
    """Write metadata.json atomically: a reader never sees half a file."""
    path = join(root, METADATA_FILE)
    fileio.write_text_atomic(path, json.dumps(meta, indent=1, sort_keys=False))
    return path
