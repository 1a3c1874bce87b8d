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


def test_sae_on_another_hook(tmp_path, train_sae):
    """--hook z: a version-2 dataset whose z is twice the hidden size wide."""
    make_dataset(str(tmp_path), layers=(1,), hidden_size=16, num_docs=200, seq_len=64, num_atoms=64, k_active=3,
                 hooks=("z", "resid_post"))
    out = train_sae.train(str(tmp_path), 1, hook="z", latents=256, k=6, steps=200, batch_size=256, lr=2e-3,
                          shuffle_buffer=4096, log_every=100, log=lambda _: None)
    assert out["hook"] == "z" and np.asarray(out["params"]["W_dec"]).shape == (256, 32)
    assert out["fve"] > 0.5


@pytest.mark.parametrize("paired", [True, False])
def test_transcoder_learns_mlp_in_to_mlp_out(tmp_path, train_sae, capsys, paired):
    """paired: mlp_out = tanh(mlp_in @ W) row for row (synthetic pairs), which the transcoder learns;
    unpaired: mlp_out is independent data, and the same training explains none of it."""
    make_dataset(str(tmp_path), layers=(2,), hidden_size=16, num_docs=300, seq_len=64, num_atoms=32, k_active=2,
                 hooks=("mlp_in", "mlp_out"), pairs=(("mlp_in", "mlp_out"),) if paired else ())
    logs = []
    out = train_sae.train(str(tmp_path), 2, transcoder=True, latents=256, k=8, steps=300, batch_size=256, lr=1e-2,
                          shuffle_buffer=4096, log_every=100, log=logs.append)
    assert out["hook"] == "mlp_in->mlp_out"
    if not paired:
        assert out["fve"] < 0.1, logs
        return
    assert out["fve"] > 0.7, logs  # measured 0.82
    assert out["fve"] > float(logs[0].split("explained variance")[1].split()[0])
    assert train_sae.main([str(tmp_path), "--layer", "2", "--transcoder", "--steps", "20", "--batch-size", "128",
                           "--log-every", "10", "--shuffle-buffer", "1024"]) == 0
    assert "layer 2 mlp_in->mlp_out: explained variance" in capsys.readouterr().out


def test_batches_hold_only_the_delivered_tokens_scaled_to_sqrt_width(tmp_path, train_sae):
    """With an older reader (no max_norm_ratio), the example applies norms.policy itself."""
    import json

    from llm_activations.format import norms

    make_dataset(str(tmp_path), layers=(2,), hidden_size=16, num_docs=100, seq_len=64)
    stats = json.load(open(tmp_path / "metadata.json"))["stats"]["2"]
    p = norms.policy(norms.NormHistogram.from_json(stats["norms"]), 1.2)  # drops a good share: visible
    assert 0 < p.dropped < p.count
    got = np.concatenate([b for b, _ in zip(train_sae.batches(str(tmp_path), 2, 128, "numpy", 4096, 0, max_norm_ratio=1.2),
                                            range(p.count // 128))])
    n = np.linalg.norm(got, axis=1)
    assert n.max() <= p.threshold * p.scaling_factor(16) * (1 + 1e-5)
    assert n.mean() == pytest.approx(4.0, rel=0.02)  # sqrt(16) over the delivered tokens


@pytest.mark.parametrize("argv,needle", [
    (["--k", "600", "--latents", "512"], "--k 600 must be between 1 and --latents (512)"),
    (["--transcoder"], "has no mlp_in activations (it has hooks resid_post); extract with --hooks mlp_in mlp_out"),
    (["--hook", "z"], "has no z activations (it has hooks resid_post); choose one with --hook"),
    (["--transcoder", "--hook", "z"], "--transcoder maps mlp_in to mlp_out; --hook z cannot be combined with it"),
    (["--max-norm-ratio", "1"], "max_norm_ratio must be a number above 1"),
])
def test_bad_options_are_one_line_exit_2(tmp_path, train_sae, capsys, argv, needle):
    make_dataset(str(tmp_path), layers=(1,), hidden_size=8, num_docs=20, seq_len=16)
    assert train_sae.main([str(tmp_path), "--steps", "2", "--batch-size", "16", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
