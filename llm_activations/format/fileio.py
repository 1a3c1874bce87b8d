"""File access for local paths and any Beam filesystem URL (gs://, s3://, ...), in one place.

Inputs, shards, manifests, metadata and merged copies all live either on a local disk or behind a
Beam filesystem. Local paths use the os module directly (fast, and errors a user recognises);
URLs go through apache_beam.io.filesystems.FileSystems, imported only when a URL is used.
Writers of files that others read while a run is going on use write_text_atomic or a temporary
name plus rename(), so a reader sees a whole file or none.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from typing import BinaryIO


def is_url(path: str) -> bool:
    return "://" in path


def _fs():
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def open_read(path: str) -> BinaryIO:
    """A binary stream of the file's raw bytes (no decompression)."""
    if is_url(path):
        return _fs().open(path, compression_type="uncompressed")
    return open(path, "rb")


def create(path: str) -> BinaryIO:
    """A binary stream writing a new file (parent folders are created for local paths)."""
    if is_url(path):
        return _fs().create(path, compression_type="uncompressed")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return open(path, "wb", buffering=1 << 20)


def exists(path: str) -> bool:
    """True if path is an existing file."""
    return _fs().exists(path) if is_url(path) else os.path.isfile(path)


def rename(src: str, dst: str) -> None:
    """Move src over dst, replacing dst if it exists."""
    if is_url(src):
        fs = _fs()
        if fs.exists(dst):
            fs.delete([dst])
        fs.rename([src], [dst])
    else:
        os.replace(src, dst)


def delete(paths: list[str]) -> None:
    """Delete files or folders (recursively)."""
    if paths:
        _fs().delete(list(paths))


def match(patterns: list[str]) -> list[str]:
    """Paths matching glob patterns; a pattern that matches nothing contributes nothing."""
    return [m.path for r in _fs().match(list(patterns)) for m in r.metadata_list]


def entries(root: str) -> list[str]:
    """Full paths of the top-level entries of a folder (local) or prefix (URL); [] if absent."""
    if not is_url(root):
        return [posixpath.join(root, n) for n in sorted(os.listdir(root))] if os.path.isdir(root) else []
    base = root.rstrip("/") + "/"
    names = {p[len(base):].split("/")[0] for p in match([base + "**"]) if p.startswith(base)}
    return [base + n for n in sorted(names)]


def files_under(root: str) -> list[str]:
    """Paths of every file below root, relative to it with '/' separators; [] if absent."""
    if is_url(root):
        base = root.rstrip("/") + "/"
        return sorted(p[len(base):] for p in match([base + "**"]) if p.startswith(base))
    if not os.path.isdir(root):
        return []
    return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                  for d, _, fs in os.walk(root) for f in fs)


def read_text(path: str) -> str | None:
    """The file's text, or None if it does not exist."""
    if is_url(path):
        if not exists(path):
            return None
    elif not os.path.isfile(path):
        return None
    with open_read(path) as f:
        return f.read().decode()


def temporary_name(path: str) -> str:
    """A unique sibling name: a retried or speculative duplicate writer may run at the same time."""
    return f"{path}.inprogress-{uuid.uuid4().hex[:12]}"


def write_text_atomic(path: str, text: str) -> None:
    """Write text to a temporary name, then rename: readers never see half a file."""
    tmp = temporary_name(path)
    with create(tmp) as f:
        f.write(text.encode())
    rename(tmp, path)


def sha256_file(path: str) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, streamed."""
    sha, size = hashlib.sha256(), 0
    with open_read(path) as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size
