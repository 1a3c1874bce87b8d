"""The extract command's output folder: check, lock, resume plan, prepare, clean up.

Everything the launcher decides about OUT comes from one listing of it (list_output, a Listing of
every file's size and identity): check_output, resume_plan and prepare_output all read that one
listing, so a --resume or --overwrite lists OUT once, and a --resume reads no shard back (the unit
manifests record each shard's size and identity; `--resume --verify` adds a sha256 of each).

Nothing is deleted before every launcher check has passed (pipeline.run_extract's order).
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import json
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llm_activations.errors import UsageError
from llm_activations.format import fileio, manifests, rewrite
from llm_activations.format import hooks as hk
from llm_activations.format.fileio import join
from llm_activations.format import names
from llm_activations.format.names import LOCK_FILE, METADATA_FILE  # LOCK_FILE: {"pid", "host", "started"}


@dataclass(frozen=True)
class Listing:
    """One listing of OUT: {path relative to OUT: fileio.Stat} of every file below it."""

    root: str
    files: dict = field(default_factory=dict)
    top: tuple[str, ...] = ()  # the top-level entries (files and folders) other than the lock

    def delete(self, rels: list[str]) -> None:
        """Delete these paths (files or folders) relative to root. On an object store, the listed
        objects at or under each: fileio.delete would list every path again (two requests each)."""
        if not rels:
            return
        if not fileio.is_url(self.root):
            fileio.delete([join(self.root, rel) for rel in rels])
            return
        found = []
        for rel in dict.fromkeys(rels):
            if rel in self.files:
                found.append(rel)
            i = bisect.bisect_left(self._sorted, rel + "/")  # the objects under it sort together
            while i < len(self._sorted) and self._sorted[i].startswith(rel + "/"):
                found.append(self._sorted[i])
                i += 1
        fileio.delete_objects([join(self.root, rel) for rel in found])

    @functools.cached_property
    def _sorted(self) -> list[str]:
        return sorted(self.files)


def list_output(root: str) -> Listing:
    root = root.rstrip("/")
    files = fileio.stat_tree(root)
    top = {rel.split("/", 1)[0] for rel in files}
    if not fileio.is_url(root) and os.path.isdir(root):  # empty local folders are entries too
        top |= set(os.listdir(root))
    return Listing(root, files, tuple(sorted(top - {LOCK_FILE})))


def ours(name: str) -> bool:
    """A top-level entry a previous extraction wrote (and --overwrite may remove)."""
    return names.written_by_extract(name, hk.HOOKS)


def check_output(cfg, listing: Listing) -> None:
    """Refuse, before anything is written or deleted: a file as --output, a non-empty folder without
    --overwrite or --resume, and --resume into a folder that holds files no extraction wrote."""
    root = listing.root
    if not fileio.is_url(root) and os.path.exists(root) and not os.path.isdir(root):
        raise UsageError(f"--output {root} exists and is not a folder")
    top = listing.top
    if cfg.resume:
        foreign = [n for n in top if not ours(n)]
        if foreign:
            raise UsageError(f"--resume: {root} holds files that no extraction wrote ({foreign[0]}); "
                             "give the output folder of the interrupted run")
    elif top and not cfg.overwrite:
        raise UsageError(f"--output {root} is not empty; pass --overwrite to replace its contents, --resume to "
                         "finish an interrupted run into it, or choose another folder")


class OutputLock:
    """OUT/_lock.json while a run writes into OUT: a second extract into the same folder is refused
    in one line. Creating it is also the probe that OUT is writable. A lock left by a dead process
    on this host is taken over with a note; one from another host is refused (delete it by hand if
    that run is gone). On object stores the check-then-write is not atomic (best effort)."""

    def __init__(self, output: str):
        self.path = join(output, LOCK_FILE)
        self._held = False

    def __enter__(self):
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        folder = os.path.dirname(self.path)
        try:
            if not self._create(json.dumps(me)):
                holder = self._holder()
                if not holder:  # empty or half-written: whoever wrote it cannot be known, so not taken over
                    raise UsageError(f"--output {folder} holds an empty or unreadable lock {self.path} (a run that "
                                     "died while starting?); delete it if no other extract writes into this folder")
                if not (holder.get("host") == me["host"] and not _alive(holder.get("pid"))):
                    raise UsageError(
                        f"--output {folder} is in use by another extract (pid {holder.get('pid')} "
                        f"on {holder.get('host')}, since {holder.get('started')}); wait for it to finish, or delete "
                        f"{self.path} if that run is gone")
                print(f"note: taking over the lock of pid {holder.get('pid')}, which is no longer running", file=sys.stderr)
                fileio.write_text_atomic(self.path, json.dumps(me))
        except OSError as e:
            raise UsageError(f"--output {folder} is not writable ({e.strerror or e})") from None
        self._held = True
        return self

    def _create(self, text: str) -> bool:
        """Create the lock file if absent; False if it exists."""
        if fileio.is_url(self.path):
            if fileio.exists(self.path):
                return False
            fileio.write_text_atomic(self.path, text)
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:  # a full disk fails here, before any work
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _holder(self) -> dict:
        """The lock's content; {} when it is empty, not JSON or lacks pid and host."""
        try:
            holder = json.loads(fileio.read_text(self.path) or "{}")
        except ValueError:  # a half-written lock: its writer died while writing it
            return {}
        return holder if isinstance(holder, dict) and holder.get("pid") is not None and holder.get("host") else {}

    def __exit__(self, *exc):
        if self._held:
            fileio.delete([self.path])
            self._held = False


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@dataclass(frozen=True)
class ResumePlan:
    """What --resume keeps and what it must redo: keep {unit: manifest}, stale [manifest] (their
    files are deleted), unusable [manifest relpath] (truncated or incomplete manifests)."""

    keep: dict = field(default_factory=dict)
    stale: list = field(default_factory=list)
    unusable: list = field(default_factory=list)


def resume_plan(cfg, fp: str, units, listing: Listing) -> ResumePlan:
    """A finished unit is kept only if its input is unchanged and every file it names is in the
    listing with the size and identity its manifest recorded (with cfg.verify, and its sha256).
    Each unit extracted again gets one line saying why."""
    found_manifests = [rel for rel in listing.files if names.is_manifest(rel)]
    done, unusable = manifests.read_manifests(listing.root, fp, sorted(found_manifests))  # refuses units of another configuration
    for rel, why in sorted(unusable.items()):
        print(f"--resume: extracting the unit of {rel} again: {why}", file=sys.stderr)
    by_index = {u.index: u for u in units}
    found = [(by_index[i], m) for i, m in sorted(done.items()) if i in by_index]

    def reason(um):
        return manifests.stale_reason(listing.root, um[1], um[0].input_fingerprint(), listing.files, cfg.verify)

    if cfg.verify:  # reads every shard: spread the hashing over threads
        with ThreadPoolExecutor(max_workers=8) as pool:
            reasons = list(pool.map(reason, found))
    else:
        reasons = [reason(um) for um in found]
    keep, stale = {}, []
    for (unit, m), why in zip(found, reasons):
        if why:
            print(f"--resume: extracting unit {unit.index} again: {why}", file=sys.stderr)
            stale.append(m)
        else:
            keep[unit.index] = m
    return ResumePlan(keep, stale, sorted(unusable))


def prepare_output(cfg, listing: Listing, plan: ResumePlan, num_units: int) -> None:
    """Make the folder ready, after every launcher check has passed: with --resume remove the old
    metadata.json, unusable manifests and the units that cannot be kept; with --overwrite remove
    the previous dataset. Works from the listing: nothing is listed again."""
    root = listing.root
    if METADATA_FILE in listing.top:  # alone and first: from here the folder is no dataset (rewrite.py)
        rewrite.unpublish(root)
    if cfg.resume:  # keep finished units; the old metadata.json (if any) is rewritten at the end
        listing.delete([n for n in listing.top if n.startswith(METADATA_FILE) and n != METADATA_FILE])
        listing.delete(list(plan.unusable))
        for m in plan.stale:  # the manifest first: from then on the unit is simply not finished
            listing.delete([names.manifest_relpath(m["unit"], num_units)])
            # delete skips what is already gone: no existence check per file
            listing.delete([s["path"] for s in m["shards"]] + ([m["rejected_file"]] if m.get("rejected_file") else []))
        return
    # Only what a previous extraction wrote; metadata.json first, so that from here on the folder
    # no longer claims to be a finished dataset.
    # metadata.json itself is gone already (unpublished above); its temporary siblings go first
    listing.delete([n for n in listing.top if n.startswith(METADATA_FILE) and n != METADATA_FILE])
    listing.delete([n for n in listing.top if ours(n) and not n.startswith(METADATA_FILE)])


def remove_partial_shards(output: str) -> None:
    """Delete temporary files that failed or retried writers left behind."""
    fileio.delete(fileio.match([join(output, g) for g in names.partial_patterns(hk.HOOKS)]))
