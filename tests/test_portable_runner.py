"""The cluster path run locally: Beam's PortableRunner (what the Flink and Spark recipes in
deploy/portable/ use) with its job server in process (--job_endpoint embed), in the LOOPBACK
environment and in the EXTERNAL environment against a Beam worker pool - the sidecar that Flink
and Spark on Kubernetes run beside each task manager. Both must write the DirectRunner's bytes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from llm_activations.cli import main
from llm_activations.format import metadata as md
from pipeline_fixtures import corpus_texts, extract_args, tiny_model_with_tokenizer, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ("--layers", "1", "3", "--num-shards", "2")


def _sha256s(out: str) -> dict:
    return {s["path"]: s["sha256"] for s in md.read_metadata(out)["shards"]}


@pytest.fixture(scope="module")
def direct(tmp_path_factory):
    """(model, input, DirectRunner output) of a small extraction every runner must reproduce."""
    folder, _ = tiny_model_with_tokenizer()
    root = tmp_path_factory.mktemp("portable")
    path = write_jsonl(str(root / "docs.jsonl"), [{"text": t} for t in corpus_texts(60, seed=5)])
    out = str(root / "direct")
    assert main(extract_args(folder, [path], out, *RUN)) == 0
    return folder, path, out


def test_portable_runner_loopback_equals_direct_runner(direct, tmp_path):
    folder, path, reference = direct
    out = str(tmp_path / "loopback")
    argv = extract_args(folder, [path], out, *RUN, "--runner", "PortableRunner", "--job_endpoint", "embed",
                        "--environment_type", "LOOPBACK")
    assert main(argv) == 0
    meta = md.read_metadata(out)
    assert meta["run"]["runner"] == "PortableRunner"
    assert _sha256s(out) == _sha256s(reference) and len(meta["shards"]) == 4
    assert meta["counts"] == md.read_metadata(reference)["counts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def worker_pool(tmp_path):
    """`python -m apache_beam.runners.worker.worker_pool_main` on a free port, with this project's
    Python and PYTHONPATH; yields its address and is killed at teardown.

    The pool starts each SDK worker as plain `python` from PATH, so the interpreter's folder goes
    first on PATH (deploy/portable/README.md: the same holds in a worker-pool container).
    """
    port = _free_port()
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)}
    log = open(tmp_path / "worker_pool.log", "w")
    pool = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                             f"--service_port={port}"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while True:  # ready when it accepts connections
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if pool.poll() is not None or time.monotonic() > deadline:
                pool.kill()
                raise RuntimeError(f"the Beam worker pool did not start; see {log.name}")
            time.sleep(0.2)
    try:
        yield f"localhost:{port}", str(tmp_path / "worker_pool.log")
    finally:
        os.killpg(pool.pid, 15)  # the pool and the SDK workers it started (its own session)
        try:
            pool.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(pool.pid, 9)
            pool.wait()
        log.close()


def test_portable_runner_external_worker_pool_equals_direct_runner(direct, worker_pool, tmp_path):
    folder, path, reference = direct
    address, pool_log = worker_pool
    out = str(tmp_path / "external")
    argv = extract_args(folder, [path], out, *RUN, "--runner", "PortableRunner", "--job_endpoint", "embed",
                        "--environment_type", "EXTERNAL", "--environment_config", address)
    # A launcher in its own process with a deadline: a worker that cannot start makes Beam retry
    # forever instead of failing.
    code = f"import sys\nfrom llm_activations.cli import main\nsys.exit(main({argv!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)})
    assert proc.returncode == 0, proc.stderr[-3000:] + open(pool_log).read()[-3000:]
    assert _sha256s(out) == _sha256s(reference)
    assert md.read_metadata(out)["counts"] == md.read_metadata(reference)["counts"]
    assert "Starting worker with command" in open(pool_log).read()  # the records came from the pool's workers
