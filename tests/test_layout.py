"""The package's import rules, enforced as folder boundaries.

* format/ (records, metadata, manifests, stats, fileio) imports no JAX, Beam or TensorFlow: every
  consumer of a dataset can use it.
* The NumPy reader (every module of reader/, tf.data's front end importing TensorFlow only when
  called) and the validate, inspect, merge and export commands run where JAX, Beam, TensorFlow and
  torch cannot be imported at all (a training host, a laptop).
* model/ never imports Beam: the extractor is usable without a pipeline.
* units.py (the host work on a unit: read, tokenize, pack, batch) imports no Beam or JAX:
  benchmarks and tests build the pipeline's exact batches without either.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import llm_activations

PACKAGE = Path(llm_activations.__file__).parent


def modules(sub: str) -> list[str]:
    return [f"llm_activations.{sub}.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE / sub)])]


def import_without(blocked: list[str], targets: list[str]) -> subprocess.CompletedProcess:
    """Import `targets` in a fresh interpreter in which every module under `blocked` raises ImportError."""
    code = textwrap.dedent(f"""
        import importlib, sys
        BLOCKED = {blocked!r}
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked by test_layout")
        sys.meta_path.insert(0, Block())
        for t in {targets!r}:
            importlib.import_module(t)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
        print("ok", len({targets!r}))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)


@pytest.mark.parametrize("targets", [
    modules("format"),
    ["llm_activations.reader", *modules("reader"), "llm_activations.commands.validate", "llm_activations.commands.inspect",
     "llm_activations.commands.merge", "llm_activations.commands.plan", "llm_activations.commands.export",
     "llm_activations.cli"],
    ["llm_activations.units", "llm_activations.inputs", "llm_activations.packing"],
], ids=["format", "reader-and-tools", "host-units"])
def test_runs_without_jax_beam_or_tensorflow(targets):
    assert targets
    r = import_without(["jax", "jaxlib", "flax", "apache_beam", "tensorflow", "torch"], targets)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"ok {len(targets)}"


def test_plan_answers_without_jax(tmp_path):
    """Not only imports: the arithmetic plan (param specs walked with the sharding rules, the mesh
    checks) runs where JAX cannot be imported, e.g. on a laptop or a training host."""
    code = textwrap.dedent("""
        import json, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("jax", "jaxlib", "flax", "apache_beam", "tensorflow", "torch"):
                    raise ImportError(name)
        sys.meta_path.insert(0, Block())
        from llm_activations.cli import main
        assert main(["plan", "--model", "Qwen2.5-7B", "--chip", "v4", "--mesh", "2,2", "--layers", "14", "--json"]) == 0
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["weights_per_chip_bytes"] > 0


def test_model_never_imports_beam():
    targets = modules("model")
    assert "llm_activations.model.extractor" in targets
    r = import_without(["apache_beam", "tensorflow", "torch"], targets)
    assert r.returncode == 0, r.stderr[-2000:]


def test_format_works_on_local_files_without_beam(tmp_path):
    """Not only imports: format/'s file functions and the launcher's input scan run on local paths
    in an interpreter where Beam, JAX and TensorFlow cannot be imported."""
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("apache_beam", "jax", "tensorflow", "torch"):
                    raise ImportError(name)
        sys.meta_path.insert(0, Block())
        import os, json
        from llm_activations.format import fileio, manifests
        from llm_activations import inputs
        root = {str(tmp_path)!r}
        fileio.write_text_atomic(fileio.join(root, "a/b/x.jsonl"), json.dumps({{"text": "hi"}}) + "\\n")
        fileio.write_text_atomic(fileio.join(root, "a/y.inprogress-1"), "partial")
        assert fileio.match([root + "/a/**/*.jsonl"]) == [root + "/a/b/x.jsonl"]
        assert sorted(fileio.stat_tree(root)) == ["a/b/x.jsonl", "a/y.inprogress-1"]
        assert fileio.stat_tree(root)["a/b/x.jsonl"].size == 15
        assert fileio.sha256_file(root + "/a/b/x.jsonl")[1] == 15
        assert [s.num_records for s in inputs.plan_sources([root + "/a/b/x.jsonl"], "text")] == [1]
        assert manifests.read_manifests(root, "fp", []) == ({{}}, {{}})
        fileio.delete(fileio.match([root + "/a/*.inprogress-*"]))
        fileio.delete([root + "/a/b"])
        assert fileio.files_under(root) == []
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_format_names_no_beam_module():
    """format/ reaches Beam only through llm_activations.beam_fs, imported at a URL's first use."""
    for path in (PACKAGE / "format").glob("*.py"):
        assert "apache_beam" not in path.read_text(), path.name
