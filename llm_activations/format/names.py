"""Every file and folder name of a dataset folder, in one place (docs/FORMAT.md, "Layout").

    OUT/metadata.json                        written last: the folder is a finished dataset
    OUT/[HOOK/]layer_LL/part-SSSSS-of-NNNNN.tfrecord[.gz]
    OUT/rejected/part-UUUUU-of-NNNNN.jsonl   one per unit that rejected records
    OUT/_units/unit-UUUUU-of-NNNNN.json      one manifest per finished unit
    OUT/_lock.json                           while an extract writes into OUT

Writers, readers, the output folder's checks and the tools all spell them through here.
"""

from __future__ import annotations

METADATA_FILE = "metadata.json"
MANIFEST_DIR = "_units"
REJECTED_DIR = "rejected"
LOCK_FILE = "_lock.json"
LAYER_PREFIX = "layer_"
PARTIAL_MARK = ".inprogress-"  # fileio.temporary_name: a file still being written (or left by a failed writer)


def layer_folder(layer: int) -> str:
    return f"{LAYER_PREFIX}{layer:02d}"


def manifest_relpath(unit: int, num_units: int) -> str:
    return f"{MANIFEST_DIR}/unit-{unit:05d}-of-{num_units:05d}.json"


def rejected_relpath(unit: int, num_units: int) -> str:
    return f"{REJECTED_DIR}/part-{unit:05d}-of-{num_units:05d}.jsonl"


def is_manifest(relpath: str) -> bool:
    return relpath.startswith(MANIFEST_DIR + "/unit-") and relpath.endswith(".json") and PARTIAL_MARK not in relpath


def written_by_extract(name: str, hooks) -> bool:
    """A top-level entry an extraction writes (what --overwrite may remove; hooks: hooks.HOOKS)."""
    return name.startswith(METADATA_FILE) or name.startswith(LAYER_PREFIX) or name in (REJECTED_DIR, MANIFEST_DIR, *hooks)


def started_extraction(name: str) -> bool:
    """A top-level entry that shows an extraction began writing here (before metadata.json)."""
    return name.startswith((MANIFEST_DIR, LAYER_PREFIX, REJECTED_DIR))


def partial_patterns(hooks) -> list[str]:
    """Globs, relative to OUT, of the temporary files that failed or retried writers leave."""
    folders = (f"{LAYER_PREFIX}*", REJECTED_DIR, MANIFEST_DIR, *(f"{h}/{LAYER_PREFIX}*" for h in hooks))
    return [f"{d}/*{PARTIAL_MARK}*" for d in folders]
