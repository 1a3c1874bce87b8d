"""The persistent compilation cache: an optimisation that never costs a run.

The cache folder holds compiled XLA programs keyed by program, devices and flags, so a second run
with the same model, shapes and mesh loads its step instead of compiling it; a shared folder
(a mount, or gs://...) lets a fleet of hosts compile once. JAX's cache is process-wide: the folder
last configured serves every compile in the process.

JAX's own file cache is replaced by CheckedCache, for four reasons (issue 22):

* JAX deserialises whatever bytes an entry holds: one flipped bit segfaulted every later run, or
  loaded a wrong program. Each entry here carries the sha256 of its bytes; an entry that fails the
  check is a miss - the step is compiled afresh and the entry rewritten.
* JAX puts the cache folder into the compile options (xla_gpu_per_fusion_autotune_cache_dir), so
  the key, and every hit, depended on the path the cache is mounted at. XLA's own side caches are
  turned off (jax_persistent_cache_enable_xla_caches): the whole executable is cached anyway, and
  the key no longer names the folder.
* A complete cache on a read-only mount is read (never written) instead of refused.
* JAX reads gs:// through etils, which imports TensorFlow, which may grab the accelerator; entries
  here go through format.fileio (Beam's GCS client), like every other file.

Every way of naming the folder (--compilation-cache, $LLM_ACTIVATIONS_COMPILATION_CACHE, the
default folder) goes through resolve() and check(), on the launcher, before any work.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass

from llm_activations.errors import UsageError
from llm_activations.format import fileio

ENV = "LLM_ACTIVATIONS_COMPILATION_CACHE"  # default folder for --compilation-cache, or "none"
OFF = "none"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
MAGIC = b"llm-activations xla entry v1\n"  # then the sha256 of the payload, then JAX's payload
ENTRY_SUFFIX = ".xla"  # not JAX's "-cache": entries JAX wrote unchecked are never read
# XLA side caches JAX would enable inside the folder (their paths enter the key); "none" names none.
XLA_SIDE_CACHES = "none"

log = logging.getLogger(__name__)


def default_folder(environ=os.environ) -> str:
    """$LLM_ACTIVATIONS_COMPILATION_CACHE, else <$XDG_CACHE_HOME or ~/.cache>/llm_activations/jax."""
    if environ.get(ENV):
        return environ[ENV]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llm_activations", "jax")


def resolve(folder: str | None, environ=os.environ) -> tuple[str | None, str]:
    """(folder in use or None when off, how it was named) for --compilation-cache's value (None:
    not given). A local folder becomes absolute; a URL is kept as given."""
    if folder is not None:
        named = f"--compilation-cache {folder}"
    elif environ.get(ENV):
        folder, named = environ[ENV], f"${ENV} {environ[ENV]}"
    else:
        folder = default_folder(environ)
        named = f"the default compilation cache folder {folder} (set --compilation-cache or ${ENV})"
    if folder.lower() == OFF:
        return None, named
    return (folder if fileio.is_url(folder) else os.path.abspath(os.path.expanduser(folder))), named


def check(folder: str | None, named: str = "") -> bool:
    """True if folder can be written, False if it can only be read (a complete cache on a read-only
    mount); UsageError, one line, if it cannot serve as a cache at all. A URL whose bucket exists is
    taken as writable: a failed upload is logged and costs nothing but the entry."""
    if folder is None:
        return True
    if fileio.is_url(folder):
        fileio.check_urls([folder])  # the scheme works here, the bucket exists
        return True
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{named or folder}: cannot use it as a cache folder ({e.strerror or e}); "
                         "give a writable folder, or none to compile without a cache") from None
    if not os.access(folder, os.R_OK | os.X_OK):
        raise UsageError(f"{named or folder}: cannot use it as a cache folder (not readable); "
                         "give a readable folder, or none to compile without a cache")
    return os.access(folder, os.W_OK)


# ----------------------------------------------------------------------------- checked entries


def pack_entry(payload: bytes) -> bytes:
    """An entry's bytes on disk: MAGIC, sha256(payload), payload."""
    return MAGIC + hashlib.sha256(payload).digest() + payload


def unpack_entry(data: bytes) -> bytes | None:
    """The payload of an entry's bytes, or None if they are not a whole, unaltered entry."""
    head = len(MAGIC) + 32
    if len(data) < head or not data.startswith(MAGIC):
        return None
    payload = data[head:]
    return payload if hashlib.sha256(payload).digest() == data[len(MAGIC):head] else None


class CheckedCache:
    """JAX's CacheInterface over fileio: entries verified on read, written whole (open_for_commit).

    get() of a missing or damaged entry returns None, so JAX compiles afresh and put()s the new
    entry over the damaged one. Read-only: put() writes nothing. No error here ever fails a run.
    """

    def __init__(self, folder: str, writable: bool = True):
        self._path = folder  # JAX logs it
        self.writable = writable
        self.damaged: list[str] = []  # keys whose entry failed its check, in this process

    def _file(self, key: str) -> str:
        return fileio.join(self._path, key + ENTRY_SUFFIX)

    def get(self, key: str) -> bytes | None:
        try:
            with fileio.open_read(self._file(key)) as f:
                data = f.read()
        except (FileNotFoundError, IOError, OSError):  # Beam raises IOError subclasses for a missing object
            return None
        payload = unpack_entry(data)
        if payload is None:
            self.damaged.append(key)
            log.warning("compilation cache entry %s is damaged (%d bytes); compiling afresh%s", self._file(key),
                        len(data), "" if self.writable else " (the cache is read-only, so it stays)")
        return payload

    def put(self, key: str, value: bytes) -> None:
        if not self.writable:
            return
        try:
            with fileio.open_for_commit(self._file(key)) as f:  # readers see a whole entry or none
                f.write(pack_entry(value))
        except Exception as e:  # a cache that cannot be written is no reason to fail a run
            log.warning("compilation cache entry %s not written: %s", self._file(key), e)

    def clear(self) -> None:
        """JAX's interface; entries are shared with other runs and hosts, so none is removed."""


def configure(folder: str | None) -> str | None:
    """Point JAX's persistent cache at folder (None: $ENV or the default; "none": off), as a
    CheckedCache, after check(). Returns the folder in use, or None when off (also when check()
    refuses the folder: the launcher has refused it in one line already, so this is a worker whose
    disk differs from the launcher's, and the cache never costs a run).

    Every program is cached whatever its compile time or size (JAX's defaults skip programs
    compiled in under a second, which on CPU is most of them).
    """
    import jax
    from jax._src import compilation_cache as jcc

    folder, named = resolve(folder)
    try:
        writable = check(folder, named)
    except UsageError as e:  # the launcher refused it already; a worker whose disk differs runs without
        log.warning("%s; compiling without a persistent cache", e)
        folder, writable = None, True
    current = jcc._cache
    if not (isinstance(current, CheckedCache) and current._path == folder and current.writable == writable):
        jcc.reset_cache()
        jax.config.update("jax_compilation_cache_dir", folder)
        if folder is not None:
            # JAX has no public way to plug in a cache; its _cache is what _get_cache() returns
            # once set, so JAX's own file cache (unchecked, etils for URLs) is never built.
            with jcc._cache_initialized_mutex:
                jcc._cache, jcc._cache_initialized = CheckedCache(folder, writable), True
    jax.config.update("jax_persistent_cache_enable_xla_caches", XLA_SIDE_CACHES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder


def in_use():
    """The CheckedCache JAX uses in this process, or None."""
    from jax._src import compilation_cache as jcc

    return jcc._cache if isinstance(jcc._cache, CheckedCache) else None


@dataclass(frozen=True)
class CompileStats:
    seconds: float  # lower + compile (or load from the cache), wall clock
    cache_hit: bool  # the persistent cache served the executable


def compile_step(jitted, *args):
    """(jitted.lower(*args).compile(), CompileStats), timed, noting whether the persistent cache
    served it (JAX records a cache-hit event for it). A compile on another thread at the same
    time could be counted too; an Extractor compiles once, at setup."""
    import jax

    hits = []

    def on_event(event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            hits.append(event)

    jax.monitoring.register_event_listener(on_event)
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    finally:
        jax.monitoring.unregister_event_listener(on_event)
    return compiled, CompileStats(time.perf_counter() - start, bool(hits))
