"""The persistent compilation cache: where it lives, and a second `extract` served from it."""

import json
import os
import subprocess
import sys

import jax

from llm_activations.model import compile_cache
from pipeline_fixtures import corpus_texts, extract_args, tiny_model_with_tokenizer, write_jsonl


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
        assert compile_cache.configure("gs://bucket/xla") == "gs://bucket/xla"  # a URL is kept as given
        assert compile_cache.configure("NONE") is None and jax.config.jax_compilation_cache_dir is None
    finally:
        compile_cache.configure("none")


def _extract(args: list[str]) -> dict:
    """One `python -m llm_activations extract` in a fresh process (a new worker, as on a fleet)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-m", "llm_activations", *args], check=True, env=env, capture_output=True)
    out = args[args.index("--output") + 1]
    with open(os.path.join(out, "metadata.json")) as f:
        return json.load(f)["run"]


def test_second_run_is_served_by_the_cache(tmp_path):
    folder, _ = tiny_model_with_tokenizer()
    corpus = write_jsonl(str(tmp_path / "docs.jsonl"), [{"text": t} for t in corpus_texts(6)])
    cache = str(tmp_path / "xla")
    runs = [_extract(extract_args(folder, [corpus], str(tmp_path / f"out{i}"), "--compilation-cache", cache))
            for i in range(2)]
    assert [r["compile_cache_hit"] for r in runs] == [False, True]
    assert all(r["compilations"] == 1 and r["compile_seconds"] > 0 for r in runs)
    print("compile seconds, cold then cached:", [r["compile_seconds"] for r in runs])


def test_an_unusable_cache_folder_is_one_line_before_any_work(tmp_path, capsys):
    from llm_activations.cli import main

    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    out = tmp_path / "out"
    assert main(["extract", "--output", str(out), "--compilation-cache", str(not_a_folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--compilation-cache {not_a_folder}: cannot use it as a cache folder" in err[0], err
    assert not out.exists()  # refused before the output folder was touched
