"""JAX's persistent compilation cache, on by default, and the compile seconds of a step.

The cache folder holds compiled XLA programs keyed by program, devices and flags, so a second
run with the same model, shapes and mesh loads its step instead of compiling it; a shared
folder (gs://...) lets a fleet of hosts compile once. JAX's cache is process-wide: the folder
last configured serves every compile in the process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import jax

from llm_activations.format import fileio

ENV = "LLM_ACTIVATIONS_COMPILATION_CACHE"  # default folder for --compilation-cache, or "none"
OFF = "none"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_folder(environ=os.environ) -> str:
    """$LLM_ACTIVATIONS_COMPILATION_CACHE, else <$XDG_CACHE_HOME or ~/.cache>/llm_activations/jax."""
    if environ.get(ENV):
        return environ[ENV]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llm_activations", "jax")


def configure(folder: str | None) -> str | None:
    """Point JAX's persistent cache at folder (None: default_folder(); "none": off).

    Returns the folder in use, or None when off. Every program is cached whatever its compile
    time or size (JAX's defaults skip programs compiled in under a second, which on CPU is
    most of them). A URL (gs://...) is passed through as is.
    """
    folder = default_folder() if folder is None else folder
    folder = None if folder.lower() == OFF else (folder if fileio.is_url(folder) else os.path.abspath(os.path.expanduser(folder)))
    if jax.config.jax_compilation_cache_dir != folder:
        from jax.experimental.compilation_cache import compilation_cache

        # JAX opens its cache once per process; a different folder needs a fresh start.
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return folder


@dataclass(frozen=True)
class CompileStats:
    seconds: float  # lower + compile (or load from the cache), wall clock
    cache_hit: bool  # the persistent cache served the executable


def compile_step(jitted, *args) -> tuple[jax.stages.Compiled, CompileStats]:
    """jitted.lower(*args).compile(), timed, noting whether the persistent cache served it (JAX
    records a cache-hit event for it). A compile on another thread at the same time could be
    counted too; an Extractor compiles once, at setup."""
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
