"""File access for local paths and any Beam filesystem URL (gs://, s3://, ...), in one place.

Inputs, shards, manifests, metadata and merged copies all live either on a local disk or behind a
Beam filesystem. Local paths use os, glob and shutil directly (fast, errors a user recognises, and
no Beam: format/ is usable where Beam is not installed); URLs go through Beam's FileSystems by way
of llm_activations.beam_fs, the one module outside format/ that does, imported only when a URL is
used.

Files that others read while a run is going on (shards, manifests, metadata.json) are written
with open_for_commit, so a reader sees a whole file or none:

* local files are written under a temporary name and renamed on commit;
* GCS objects are uploaded straight to their final name: an upload becomes visible only when it
  is finalized (commit), and abort cancels it, so no rename is needed - on GCS a rename is a
  server-side copy plus a delete, which would pay for every multi-GB shard twice;
* other object stores (s3://, azfs://, ...) keep the temporary name and rename: Beam's writers
  for them cannot cancel an upload, so closing a failed writer would publish half a file under
  the final name.

Remote storage faults end in one line within a bounded time (issue 22). Every remote call goes
through _remote, which turns an outage into errors.StorageUnavailable (exit 1) and a bucket that
does not exist into a UsageError (exit 2). The GCS client's retries share one process-wide budget
(RetryBudget, RETRY_SECONDS, or $LLM_ACTIVATIONS_STORAGE_RETRY_SECONDS): once an outage has lasted
that long, every further request - the cleanup of partial files and of the lock included - fails
at once instead of retrying for two minutes each.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import io
import os
import posixpath
import threading
import time
import shutil
import uuid
import weakref
from dataclasses import dataclass
from typing import BinaryIO

from llm_activations.errors import StorageUnavailable, UsageError
from llm_activations.format.names import PARTIAL_MARK

# Object stores whose Beam writer can cancel an unfinished upload (BlobWriter.terminate).
DIRECT_UPLOAD_SCHEMES = ("gs",)
BEAM_VERSION_HINT = "apache-beam[gcp]==2.77.0"
# Seconds an outage of remote storage is retried, all requests of the process together, before
# every request fails at once (docs/FORMAT.md, "Exit statuses"); the environment variable sets it.
RETRY_SECONDS = 60.0
RETRY_SECONDS_ENV = "LLM_ACTIVATIONS_STORAGE_RETRY_SECONDS"


def is_url(path: str) -> bool:
    """A Beam filesystem URL (gs://b/x, s3://..., hf://...) rather than a local path: the one test."""
    return "://" in path


def split_url(url: str) -> tuple[str, str]:
    """("gs", "bucket/x") for gs://bucket/x: the scheme in lower case and the rest."""
    scheme_name, rest = url.split("://", 1)
    return scheme_name.lower(), rest


def scheme(path: str) -> str:
    return split_url(path)[0] if is_url(path) else ""


def join(root: str, *parts: str) -> str:
    """Join for local paths and URLs alike (gs://bucket/x + a/b)."""
    return posixpath.join(root.rstrip("/") or "/", *parts)


def _fs():
    """Beam's FileSystems (llm_activations.beam_fs, imported at the first URL)."""
    from llm_activations import beam_fs

    return beam_fs.filesystems()


# ----------------------------------------------------------------------------- URL support checks


@functools.cache
def check_url_support(scheme_name: str) -> None:
    """UsageError naming what to install or set when URLs of this scheme cannot work here.

    Runs once per scheme and process, at the first URL of that scheme, so every command fails in
    one line at its edge instead of in a traceback (or after Beam's credential retries) mid-run.
    """
    if scheme_name == "gs":
        try:
            from llm_activations import beam_fs

            beam_fs.register_gcs()
        except ImportError:
            raise UsageError(f"gs:// paths need Beam's GCP extra: pip install '{BEAM_VERSION_HINT}'") from None
        check_gcs_credentials()
        bound_gcs_retries(retry_seconds())
        return
    try:
        _fs().get_filesystem(f"{scheme_name}://x")
    except ValueError:
        raise UsageError(f"{scheme_name}:// paths: Apache Beam has no filesystem for this scheme here "
                         "(install the Beam extra that provides it, e.g. apache-beam[aws] for s3://)") from None


def check_gcs_credentials() -> None:
    """Google application default credentials must exist (or an emulator be named) for gs://."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):  # google-cloud-storage talks to the emulator, anonymously
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError:
        raise UsageError("gs:// paths need Google Cloud credentials: run `gcloud auth application-default login` "
                         "or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file "
                         "(or STORAGE_EMULATOR_HOST for a GCS emulator)") from None


def check_urls(paths) -> None:
    """check_url_support for every URL among paths, and check_bucket for every gs:// bucket (the
    launcher calls this before any work)."""
    for name in sorted({scheme(p) for p in paths if is_url(p)}):
        check_url_support(name)
    for p in paths:
        if scheme(p) == "gs":
            check_bucket(split_url(p)[1].split("/")[0])


def _beam(path: str):
    """Beam's FileSystems, after the one-line checks that this URL's scheme works here and that its
    bucket exists."""
    check_url_support(scheme(path))
    if scheme(path) == "gs":
        check_bucket(split_url(path)[1].split("/")[0])
    return _fs()


@functools.cache
def check_bucket(name: str) -> None:
    """UsageError (one line) if the GCS bucket does not exist or cannot be seen; once per bucket
    and process (a failed check is not remembered)."""
    from google.api_core.exceptions import Forbidden

    from llm_activations import beam_fs

    url = f"gs://{name}"
    with _remote(url):
        try:
            found = beam_fs.get_gcs_bucket(name)
        except Forbidden:
            raise UsageError(f"{url}: these credentials may not use this bucket (403 Forbidden)") from None
    if found is None:
        raise UsageError(f"{url}: the bucket does not exist; create it or correct the path")


# ----------------------------------------------------------------------------- remote faults


def retry_seconds(environ=os.environ) -> float:
    """$LLM_ACTIVATIONS_STORAGE_RETRY_SECONDS, else RETRY_SECONDS; UsageError if not a positive number."""
    text = environ.get(RETRY_SECONDS_ENV)
    if not text:
        return RETRY_SECONDS
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise UsageError(f"${RETRY_SECONDS_ENV} {text!r}: give the seconds to retry a storage outage, a positive number")
    return value


class RetryBudget:
    """The GCS client's retry predicate, with one budget for the whole process.

    An outage starts at the first retryable error after a quiet spell of `seconds`; while it lasts
    less than `seconds`, retryable errors are retried (the client's own backoff), after that none
    is. So a dead endpoint costs one budget in all, however many requests and cleanup steps come
    after the first, and however many threads wait on it.
    """

    def __init__(self, seconds: float, retryable):
        self.seconds, self.retryable = seconds, retryable
        self._lock = threading.Lock()
        self._start = self._last = None

    def __call__(self, exc: Exception) -> bool:
        if not self.retryable(exc):
            return False
        now = time.monotonic()
        with self._lock:
            if self._last is None or now - self._last > self.seconds:
                self._start = now  # a new outage
            self._last = now
            return now - self._start < self.seconds


def bound_gcs_retries(seconds: float) -> None:
    """Make the GCS client's retry policies (google-cloud-storage's DEFAULT_RETRY, which its uploads
    and downloads take as a default argument, and Beam's copy of it) share one RetryBudget of
    `seconds`, and stop each call's own retrying after `seconds` as well (their default: 120 s per
    request, one request after another). The policies are shared objects and the client offers no
    other way to set them for every call, so they are updated in place, once per process."""
    from google.cloud.storage import retry as gcs_retry

    from llm_activations import beam_fs

    budget = RetryBudget(seconds, gcs_retry._should_retry)
    for policy in (gcs_retry.DEFAULT_RETRY, beam_fs.gcs_retry_policy()):
        policy._predicate = budget
        policy._timeout = policy._deadline = seconds


def _outage(exc: BaseException) -> BaseException | None:
    """The storage outage behind exc (a retryable error, or the client's give-up), if any; Beam
    wraps the error of each path of a batch operation in a BeamIOError."""
    from google.api_core.exceptions import RetryError
    from google.cloud.storage.retry import _should_retry

    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RetryError) or (isinstance(e, Exception) and _should_retry(e)):
            return e
        todo += [e.__cause__, e.__context__, *(getattr(e, "exception_details", None) or {}).values()]
    return None


@contextlib.contextmanager
def _remote(path: str):
    """Run a request for path: a storage outage becomes StorageUnavailable, one line."""
    try:
        yield
    except (StorageUnavailable, UsageError):
        raise
    except Exception as e:
        cause = _outage(e) if scheme(path) == "gs" else None
        if cause is None:
            raise
        reason = str(cause).splitlines()[0][:160] if str(cause) else type(cause).__name__
        raise StorageUnavailable(
            f"{path}: storage stopped answering ({type(cause).__name__}: {reason}); gave up after retrying "
            f"for {retry_seconds():g} s (${RETRY_SECONDS_ENV} sets how long)") from None


class _RemoteStream:
    """A URL's read or write stream whose every call goes through _remote."""

    def __init__(self, raw, path: str):
        self._raw, self._path = raw, path

    def __getattr__(self, name):
        attr = getattr(self._raw, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with _remote(self._path):
                return attr(*args, **kwargs)

        return call

    def __iter__(self):  # lines; dunder methods bypass __getattr__
        lines = iter(self._raw)
        while True:
            with _remote(self._path):
                line = next(lines, None)
            if line is None:
                return
            yield line

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        with _remote(self._path):
            self._raw.close()


# ----------------------------------------------------------------------------- reading


def open_read(path: str) -> BinaryIO:
    """A binary stream of the file's raw bytes (no decompression)."""
    if is_url(path):
        fs = _beam(path)
        with _remote(path):
            return _RemoteStream(fs.open(path, compression_type="uncompressed"), path)
    return open(path, "rb")


def exists(path: str) -> bool:
    """True if path is an existing file."""
    if not is_url(path):
        return os.path.isfile(path)
    fs = _beam(path)
    with _remote(path):
        return fs.exists(path)


def size(path: str) -> int | None:
    """Size in bytes of a file, or None if it does not exist (one metadata request on a URL)."""
    if not is_url(path):
        return os.path.getsize(path) if os.path.isfile(path) else None
    fs = _beam(path)
    with _remote(path):
        found = [m.size_in_bytes for r in fs.match([path]) for m in r.metadata_list if m.path == path]
    return found[0] if found else None


def checksum(path: str) -> str:
    """The object store's own checksum of a file at a URL (no download)."""
    fs = _beam(path)
    with _remote(path):
        return fs.checksum(path)


def match(patterns: list[str]) -> list[str]:
    """Paths matching glob patterns; a pattern that matches nothing contributes nothing.

    Local patterns go through glob (** spans folders), never through Beam: format/ stays usable
    where Beam is not installed.
    """
    local = [p for p in patterns if not is_url(p)]
    urls = [p for p in patterns if is_url(p)]
    found = [f for p in local for f in sorted(glob.glob(p, recursive=True))]
    for p in urls:
        _beam(p)
    if urls:
        with _remote(urls[0]):
            found += [m.path for r in _fs().match(urls) for m in r.metadata_list]
    return found


@dataclass(frozen=True)
class Stat:
    """What one listing says about a file: its size and a cheap identity that changes whenever the
    file is rewritten: "mtime_ns:..." locally; on GCS "crc32c:...", the store's checksum of the
    content (computed by the store, so it survives a copy of the dataset, which a generation does
    not); "" where the store lists none, so that only the size can be compared."""

    size: int
    identity: str


def stat(path: str) -> Stat | None:
    """Stat of one file, or None if it does not exist (one request on an object store)."""
    if not is_url(path):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return _local_stat(st)
    return _listed(path).get(path)


def stat_tree(root: str) -> dict[str, Stat]:
    """{path relative to root ('/' separators): Stat} of every file below root, from one listing
    (local: a directory walk and a stat per file, no file read); {} if root is absent."""
    if not is_url(root):
        out = {}
        for d, _, fs in os.walk(root):
            for f in fs:
                full = os.path.join(d, f)
                try:
                    out[os.path.relpath(full, root).replace(os.sep, "/")] = _local_stat(os.stat(full))
                except FileNotFoundError:  # removed while listed
                    continue
        return out
    base = root.rstrip("/") + "/"
    return {p[len(base):]: st for p, st in _listed(base).items() if p.startswith(base) and len(p) > len(base)}


def _local_stat(st: os.stat_result) -> Stat:
    return Stat(st.st_size, f"mtime_ns:{st.st_mtime_ns}")


def _listed(prefix: str) -> dict[str, Stat]:
    """{url: Stat} of the objects whose names start with prefix, in one (paged) listing. GCS lists
    each object's crc32c; other stores' listings give sizes only."""
    _beam(prefix)
    with _remote(prefix):
        if scheme(prefix) == "gs":
            from llm_activations import beam_fs

            return {url: Stat(size, f"crc32c:{crc}") for url, size, crc in beam_fs.list_gcs(prefix)}
        pattern = prefix + ("**" if prefix.endswith("/") else "*")  # a tree, or one object (and its siblings by name)
        return {m.path: Stat(m.size_in_bytes, "") for r in _fs().match([pattern]) for m in r.metadata_list}


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


class HashingReader(io.RawIOBase):
    """The one hash-while-streaming reader: passes a raw stream's bytes on and into a sha256 and a
    byte count (validate, merge's verified copy, the launcher's input scan and sha256_file use it).
    Wrap it in io.BufferedReader or a decompressor as needed; drain() hashes what is left."""

    def __init__(self, raw):
        self._raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        data = self._raw.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 22):
            pass

    def close(self) -> None:
        self._raw.close()
        super().close()


def sha256_file(path: str) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, streamed."""
    with HashingReader(open_read(path)) as f:
        f.drain()
        return f.sha.hexdigest(), f.size


# ----------------------------------------------------------------------------- writing


def create(path: str) -> BinaryIO:
    """A binary stream writing a new file (parent folders are created for local paths).

    Visible under its name as it is written (local) or when closed (object stores); files that
    readers must see whole or not at all go through open_for_commit instead.
    """
    if is_url(path):
        fs = _beam(path)
        with _remote(path):
            return _RemoteStream(fs.create(path, compression_type="uncompressed"), path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return open(path, "wb", buffering=1 << 20)


def temporary_name(path: str) -> str:
    """A unique sibling name: a retried or speculative duplicate writer may run at the same time."""
    return f"{path}{PARTIAL_MARK}{uuid.uuid4().hex[:12]}"


def writes_in_place(path: str) -> bool:
    """True where open_for_commit uploads straight to the final name (no temporary, no rename)."""
    return scheme(path) in DIRECT_UPLOAD_SCHEMES


class CommitWriter:
    """A file that appears under its final name only on commit(), whole; abort() leaves nothing.

    Used as a context manager it commits on success and aborts on an exception. A writer dropped
    without either (a failed bundle's DoFn going away) is aborted when collected: the weakref
    finalizer holds the underlying stream, so the garbage collector can never close - and on an
    object store thereby publish - that stream before the abort has run.
    """

    def __init__(self, path: str):
        self.path = path
        self._tmp = None if writes_in_place(path) else temporary_name(path)
        self._raw = create(self._tmp or path)
        self._abort = weakref.finalize(self, _abandon, self._raw, self._tmp)

    def write(self, data) -> int:
        return self._raw.write(data)

    def flush(self) -> None:
        self._raw.flush()

    def commit(self) -> None:
        """Finish the file: close (finalizing an upload) and, with a temporary name, rename it."""
        self._abort.detach()
        self._raw.close()
        if self._tmp is not None:
            rename(self._tmp, self.path)

    def abort(self) -> None:
        """Discard the file: cancel the upload, or close and delete the temporary file."""
        self._abort()

    def __enter__(self) -> "CommitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def _abandon(raw, tmp: str | None) -> None:
    if tmp is None:
        raw.terminate()  # GCS BlobWriter: cancels the resumable upload; nothing becomes visible
        return
    try:
        raw.close()
    finally:
        delete([tmp])


def open_for_commit(path: str) -> CommitWriter:
    """A writable for `path` that readers see whole or not at all (see CommitWriter)."""
    return CommitWriter(path)


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file that readers never see half-written."""
    with open_for_commit(path) as f:
        f.write(text.encode())


# ----------------------------------------------------------------------------- moving, deleting


def rename(src: str, dst: str) -> None:
    """Move src over dst, replacing dst if it exists."""
    if is_url(src):
        fs = _beam(src)
        if exists(dst):
            delete([dst])
        with _remote(src):
            fs.rename([src], [dst])
    else:
        os.replace(src, dst)


def delete(paths: list[str]) -> None:
    """Delete files or folders (recursively); paths that do not exist are ignored."""
    for p in paths:
        if is_url(p):
            continue
        with contextlib.suppress(FileNotFoundError):  # other errors (permissions) are the caller's to see
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
    urls = [p for p in paths if is_url(p)]
    if not urls:
        return
    # On an object store a "folder" is a name prefix: delete the object itself and all below it.
    delete_objects(match([q for p in urls for q in (p.rstrip("/"), p.rstrip("/") + "/**")]))


def delete_objects(urls: list[str]) -> None:
    """Delete these exact objects (known from a listing: no further listing is made)."""
    gcs = [o for o in urls if scheme(o) == "gs"]
    if gcs:
        _delete_gcs_objects(gcs)
    other = [o for o in urls if scheme(o) != "gs"]
    if other:
        with _remote(other[0]):
            _fs().delete(other)


def _delete_gcs_objects(paths: list[str]) -> None:
    from llm_activations import beam_fs

    with _remote(paths[0]):
        beam_fs.delete_gcs_objects(paths)
