"""The one rule for every command that rewrites a dataset folder in place (merge into an existing
OUT, extract --overwrite or --resume, a future export):

    the folder stops being a readable dataset before the first destructive step, and becomes one
    again only when the rewrite is complete.

A folder is a dataset exactly when its metadata.json is there (metadata.py; readers and tools all
start from it). So a rewrite first removes metadata.json - alone, before any other file is
replaced or deleted, and checked gone - and writes the new one last. A rewrite that fails half
way leaves a folder every reader refuses in one line ("no metadata.json"), never old metadata
over new shards.

    with rewriting(out) as publish:   # metadata.json is gone from here on
        ... replace, copy, delete files ...
        publish(new_metadata)         # last: out is a dataset again
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from llm_activations.errors import Fault
from llm_activations.format import fileio
from llm_activations.format import metadata as md


def unpublish(root: str) -> None:
    """Make root unreadable as a dataset: delete its metadata.json (if any), alone, and check it is gone."""
    path = fileio.join(root, md.METADATA_FILE)
    fileio.delete([path])
    if fileio.exists(path):  # e.g. a read-only folder: nothing else may be touched then
        raise Fault(f"cannot remove {path}; the dataset was left as it was")


@contextlib.contextmanager
def rewriting(root: str) -> Iterator[Callable[[dict], str]]:
    """unpublish(root) on entry; yields publish(meta), which writes metadata.json (atomically) and
    must be the rewrite's last step. On an exception the folder stays unpublished."""
    unpublish(root)
    yield lambda meta: md.write_metadata(root, meta)
