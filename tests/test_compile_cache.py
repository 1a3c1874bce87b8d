"""The persistent compilation cache: where it lives, a second `extract` served from it, and the rule
that it is an optimisation that never costs a run (issue 22 items 6-8): damaged entries are
compiled afresh and replaced, hits do not depend on the folder's path, a read-only cache is read,
and every way of naming the folder goes through one check."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from llm_activations.cli import main
from llm_activations.model import compile_cache
from pipeline_fixtures import corpus_texts, extract_args, tiny_model_with_tokenizer, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_folder():
    assert compile_cache.default_folder({"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/llm_activations/jax"
    assert compile_cache.default_folder({}) == os.path.join(os.path.expanduser("~"), ".cache", "llm_activations", "jax")
    env = {"XDG_CACHE_HOME": "/x/cache", compile_cache.ENV: "/shared/xla"}
    assert compile_cache.default_folder(env) == "/shared/xla"


def test_configure(tmp_path):
    try:
        assert compile_cache.configure(str(tmp_path)) == str(tmp_path)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        assert compile_cache.in_use()._path == str(tmp_path)
        assert compile_cache.configure(str(tmp_path / "a" / ".." / "b")) == str(tmp_path / "b")  # made absolute
        assert (tmp_path / "b").is_dir()  # a URL is kept as given: test_gcs.py
        assert compile_cache.configure("NONE") is None and jax.config.jax_compilation_cache_dir is None
        assert compile_cache.in_use() is None
        (tmp_path / "file").write_text("")  # a worker whose folder cannot serve compiles without a cache
        assert compile_cache.configure(str(tmp_path / "file")) is None and compile_cache.in_use() is None
    finally:
        compile_cache.configure("none")


def test_entries_carry_their_checksum():
    payload = os.urandom(1000)
    entry = compile_cache.pack_entry(payload)
    assert compile_cache.unpack_entry(entry) == payload
    for i in (0, len(compile_cache.MAGIC) + 5, len(entry) // 2, len(entry) - 1):  # magic, checksum, payload
        bad = bytearray(entry)
        bad[i] ^= 0x10
        assert compile_cache.unpack_entry(bytes(bad)) is None
    assert compile_cache.unpack_entry(entry[: len(entry) // 2]) is None
    assert compile_cache.unpack_entry(b"") is None


# ----------------------------------------------------------------------------- extract, cold and cached


def _extract(args: list[str], env: dict | None = None) -> dict:
    """One `python -m llm_activations extract` in a fresh process (a new worker, as on a fleet);
    returns metadata.json with the shards' sha256 recomputed from the files."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "llm_activations", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = args[args.index("--output") + 1]
    with open(os.path.join(out, "metadata.json")) as f:
        meta = json.load(f)
    meta["stored"] = {s["path"]: hashlib.sha256(open(os.path.join(out, s["path"]), "rb").read()).hexdigest()
                      for s in meta["shards"]}
    return meta


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """A cache filled by one cold run, and that run's dataset: the reference for every cached run."""
    base = tmp_path_factory.mktemp("cache")
    folder, _ = tiny_model_with_tokenizer()
    corpus = write_jsonl(str(base / "docs.jsonl"), [{"text": t} for t in corpus_texts(6)])
    cache = str(base / "xla")
    args = lambda out, cache_folder: extract_args(folder, [corpus], out, "--compilation-cache", cache_folder)
    meta = _extract(args(str(base / "out0"), cache))
    assert meta["run"]["compile_cache_hit"] is False
    return {"cache": cache, "args": args, "meta": meta, "base": base}


def _entries(cache: str) -> list[str]:
    return sorted(os.path.join(cache, n) for n in os.listdir(cache) if os.path.isfile(os.path.join(cache, n)))


def _same_dataset(meta: dict, reference: dict) -> None:
    assert meta["stored"] == reference["stored"] == {s["path"]: s["sha256"] for s in reference["shards"]}
    assert meta["counts"] == reference["counts"] and meta["stats"] == reference["stats"]


def test_a_moved_cache_still_hits(cold, tmp_path):
    """JAX put the folder's path into the key (xla_gpu_per_fusion_autotune_cache_dir): a copy at
    another path, as a fleet mounts one cache at different paths, missed."""
    moved = str(tmp_path / "elsewhere" / "mounted-xla")
    shutil.copytree(cold["cache"], moved)
    meta = _extract(cold["args"](str(tmp_path / "out"), moved))
    assert meta["run"]["compile_cache_hit"] is True
    assert meta["run"]["compilations"] == 1 and meta["run"]["compile_seconds"] > 0
    _same_dataset(meta, cold["meta"])
    print("compile seconds, cold then cached:", [cold["meta"]["run"]["compile_seconds"], meta["run"]["compile_seconds"]])


EXTRACTOR = dict(layers=[1], batch_size=2, seq_len=16, compute_dtype="float32", storage_dtype="float32", mesh_shape=(1, 1))


def _activations(extractor) -> np.ndarray:
    from tiny_models import packed_batch

    return extractor(*packed_batch([[8], [3, 2]], 16)[:3]).activations[("resid_post", 1)]


def _alter_program(data: bytes) -> bytes:
    """The entry with one flipped bit inside its program, re-compressed, so that the bytes still
    decompress (JAX's zstd frames carry no checksum): what JAX would load and run unchecked."""
    from jax._src import compilation_cache as jcc

    head = len(compile_cache.MAGIC) + 32 if data.startswith(compile_cache.MAGIC) else 0
    program = bytearray(jcc.decompress_executable(data[head:]))
    program[len(program) // 2] ^= 0x01
    return data[:head] + jcc.compress_executable(bytes(program))


@pytest.mark.parametrize("damage", ["flipped bit", "truncated", "altered program"])
def test_a_damaged_entry_is_compiled_afresh_and_replaced(tmp_path, damage):
    """One flipped bit in an entry segfaulted every later run (or, at another offset, loaded a wrong
    program); a truncated one was recompiled but never rewritten. The step's entry is damaged in
    place (the weight-loading programs stay in this process's memory cache, so only the step is
    looked up again); the next Extractor must compile afresh, compute the reference numbers and
    leave a whole entry behind."""
    from llm_activations.model.extractor import Extractor

    cache = str(tmp_path / "xla")
    folder, _ = tiny_model_with_tokenizer()
    try:
        reference = _activations(Extractor(folder, compilation_cache=cache, **EXTRACTOR))
        entries = [p for p in _entries(cache) if os.path.basename(p).startswith("jit_step-")]
        assert len(entries) == 1
        for path in entries:
            data = bytearray(open(path, "rb").read())
            if damage == "flipped bit":
                data[len(data) * 2 // 3] ^= 0x04
            elif damage == "truncated":
                del data[len(data) // 2:]
            else:
                data = _alter_program(bytes(data))
            open(path, "wb").write(bytes(data))
        again = Extractor(folder, compilation_cache=cache, **EXTRACTOR)
        assert not again.compile_stats.cache_hit  # compiled, not served from the damaged entry
        np.testing.assert_array_equal(_activations(again), reference)
        assert [p for p in _entries(cache) if os.path.basename(p).startswith("jit_step-")] == entries
        assert all(compile_cache.unpack_entry(open(p, "rb").read()) is not None for p in entries)  # replaced, whole
        third = Extractor(folder, compilation_cache=cache, **EXTRACTOR)
        assert third.compile_stats.cache_hit
        np.testing.assert_array_equal(_activations(third), reference)
    finally:
        compile_cache.configure("none")


def test_a_read_only_cache_is_read_not_refused(tmp_path, monkeypatch):
    """A complete cache on a read-only mount is used for reading, never written. (Tests may run as
    root, who may write anywhere, so the mount's answer to access(W_OK) is given by monkeypatch.)"""
    from llm_activations.model.extractor import Extractor
    from llm_activations.options import check_cache_folder

    ro = str(tmp_path / "ro-xla")
    folder, _ = tiny_model_with_tokenizer()
    try:
        first = Extractor(folder, compilation_cache=ro, **EXTRACTOR)  # fills the cache; then the mount turns read-only
        assert not first.compile_stats.cache_hit
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if mode & os.W_OK and str(p).startswith(ro)
                            else real_access(p, mode, **k))
        assert check_cache_folder(ro) == ro  # was: "cannot use it as a cache folder (not writable)"
        before = {p: open(p, "rb").read() for p in _entries(ro)}
        hit = Extractor(folder, compilation_cache=ro, **EXTRACTOR)
        assert hit.compile_stats.cache_hit and compile_cache.in_use().writable is False
        other = Extractor(folder, compilation_cache=ro, **{**EXTRACTOR, "seq_len": 8})  # a miss: compiled, not written
        assert not other.compile_stats.cache_hit
        assert {p: open(p, "rb").read() for p in _entries(ro)} == before
        np.testing.assert_array_equal(_activations(hit), _activations(first))
    finally:
        compile_cache.configure("none")


# ----------------------------------------------------------------------------- one check, however named


@pytest.mark.parametrize("how", ["option", "environment", "default"])
def test_an_unusable_cache_folder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, how):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    out = tmp_path / "out"
    folder, _ = tiny_model_with_tokenizer()
    capsys.readouterr()
    argv = extract_args(folder, [str(tmp_path / "docs.jsonl")], str(out))
    if how == "option":
        argv += ["--compilation-cache", str(not_a_folder)]
        named = f"--compilation-cache {not_a_folder}"
    elif how == "environment":
        monkeypatch.setenv(compile_cache.ENV, str(not_a_folder))
        named = f"${compile_cache.ENV} {not_a_folder}"
    else:  # the default folder lies below $XDG_CACHE_HOME, here a file
        monkeypatch.delenv(compile_cache.ENV, raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(not_a_folder))
        named = f"the default compilation cache folder {not_a_folder}/llm_activations/jax"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{named}" in err[0] and "cannot use it as a cache folder" in err[0], err
    assert not out.exists()  # refused before the output folder was touched
