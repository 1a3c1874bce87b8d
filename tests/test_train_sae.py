"""examples/train_sae.py learns a synthetic sparse dictionary: explained variance well above zero."""

import importlib.util
import os

import numpy as np
import pytest
from synthetic import make_dataset

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "train_sae.py")


@pytest.fixture(scope="module")
def train_sae():
    spec = importlib.util.spec_from_file_location("train_sae", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_topk_sae_explains_variance(tmp_path, train_sae):
    make_dataset(str(tmp_path), layers=(2,), hidden_size=32, num_docs=300, seq_len=64, num_atoms=128, k_active=4)
    logs = []
    out = train_sae.train(
        str(tmp_path), 2, latents=256, k=8, steps=300, batch_size=256, lr=2e-3, shuffle_buffer=4096,
        log_every=100, log=logs.append,
    )
    assert len(logs) == 3
    assert out["fve"] > 0.6, logs
    assert 0.0 <= out["dead_fraction"] < 0.5
    w = np.asarray(out["params"]["W_dec"])
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    # still learning after the first log line: the number measures training, not the init
    first = float(logs[0].split("explained variance")[1].split()[0])
    assert out["fve"] > first
