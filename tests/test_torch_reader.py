"""torch_reader: the NumPy reader's batches as torch tensors, exactly; DataLoader workers split the files."""

import numpy as np
import pytest
from synthetic import make_dataset, read_all_rows

torch = pytest.importorskip("torch")

from llm_activations import reader, torch_reader  # noqa: E402

KEYS = ("activations", "token_ids", "doc_index", "token_index", "position")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matmuls: torch's intra-op threads only contend with the reader's and other tests' (40 s -> 1 s seen)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("torch"))
    make_dataset(root, layers=(2,), hidden_size=16, num_docs=60, seq_len=64, num_shards=5, seed=2,
                 hooks=("mlp_in", "mlp_out", "resid_post"))
    return root


@pytest.mark.parametrize("kw", [
    dict(shuffle_buffer=300, seed=3),
    dict(shuffle_buffer=0, drop_remainder=False),
    dict(shuffle_buffer=500, seed=9, normalize=True, hook="mlp_out"),
])
def test_torch_batches_are_the_numpy_batches(dataset, kw):
    ref = [np.array(b) for b in reader.iter_numpy_batches(dataset, 2, 48, **kw)]
    it = torch_reader.torch_batches(dataset, 2, 48, **kw)
    got = list(it)  # all kept: the pool must not reuse a buffer a tensor still holds
    assert len(got) == len(ref) > 5
    for t, r in zip(got, ref):
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
        np.testing.assert_array_equal(t.numpy(), r)
    assert it.stats.delivered_tokens == sum(len(r) for r in ref)


def test_tensors_share_the_readers_memory(dataset):
    """Zero-copy: a tensor is a view of the batch the NumPy engine wrote (from_numpy, no copy)."""
    batch = next(reader.iter_numpy_batches(dataset, 2, 32, seed=0))
    t = torch_reader._to_torch(batch)
    assert t.data_ptr() == batch.ctypes.data
    pair = torch_reader._to_torch((batch, batch[:3]))
    assert pair[1].data_ptr() == batch.ctypes.data


def test_with_metadata_and_pairs(dataset):
    kw = dict(shuffle_buffer=200, seed=5, drop_remainder=False, with_metadata=True)
    ref = list(reader.iter_numpy_pairs(dataset, 2, 40, **kw))
    got = list(torch_reader.torch_pairs(dataset, 2, 40, **kw))
    assert len(got) == len(ref) > 5
    for t, r in zip(got, ref):
        for k in (*KEYS, "target"):
            np.testing.assert_array_equal(t[k].numpy(), r[k])
    plain = list(torch_reader.torch_pairs(dataset, 2, 40, shuffle_buffer=200, seed=5, drop_remainder=False))
    np.testing.assert_array_equal(torch.cat([x for x, _ in plain]).numpy(), np.concatenate([r["activations"] for r in ref]))
    np.testing.assert_array_equal(torch.cat([y for _, y in plain]).numpy(), np.concatenate([r["target"] for r in ref]))


def _keys(d) -> np.ndarray:
    return d["doc_index"].astype(np.int64) * 100_000 + d["token_index"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_workers_split_files_and_deliver_each_token_once(dataset, num_workers):
    ds = torch_reader.TorchActivations(dataset, 2, 32, shuffle_buffer=200, seed=1, with_metadata=True, drop_remainder=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)
    batches = list(loader)
    got = {k: torch.cat([b[k] for b in batches]).numpy() for k in KEYS}
    ref = read_all_rows(dataset, 2)
    assert len(got["token_ids"]) == len(ref["token_ids"])
    order, ref_order = np.argsort(_keys(got)), np.argsort(_keys(ref))
    assert len(np.unique(_keys(got))) == len(got["token_ids"])  # no token twice
    for k in KEYS:
        np.testing.assert_array_equal(got[k][order], ref[k][ref_order])
    if num_workers == 0:  # one process: exactly torch_batches' pass
        want = list(reader.iter_numpy_batches(dataset, 2, 32, shuffle_buffer=200, seed=1, with_metadata=True, drop_remainder=False))
        np.testing.assert_array_equal(got["activations"], np.concatenate([w["activations"] for w in want]))
    ds.set_epoch(1)
    again = torch.cat([b["doc_index"] for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers)])
    assert not torch.equal(again, torch.from_numpy(got["doc_index"]))  # a new order for a new epoch



def test_saelens_trainer_trains_on_torch_batches(dataset):
    """SAELens' own SAETrainer, a few steps on torch_batches: the data provider it takes is any tensor iterator."""
    pytest.importorskip("sae_lens")
    import itertools

    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(0)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=16, d_sae=64, l1_coefficient=1.0, dtype="float32", device="cpu"))
    epochs = (torch_reader.torch_batches(dataset, 2, 64, seed=e, normalize=True) for e in itertools.count())
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=64 * 60, train_batch_size_samples=64, lr=1e-3, lr_end=1e-3,
                                          device="cpu"), sae, itertools.chain.from_iterable(epochs))
    held_out = next(torch_reader.torch_batches(dataset, 2, 1024, seed=99, normalize=True))

    def mse():
        with torch.no_grad():
            return float(((sae(held_out) - held_out) ** 2).sum(-1).mean())

    before = mse()
    trainer.fit()
    assert trainer.n_training_steps == 60
    assert mse() < 0.8 * before


def test_torch_sae_example_learns_the_synthetic_dictionary(dataset):
    pytest.importorskip("sae_lens")
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_sae_torch.py")
    spec = importlib.util.spec_from_file_location("train_sae_torch", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.train(dataset, 2, steps=150, batch_size=256, latents=64, l1=0.2, lr=3e-3)
    assert out["steps"] == 150
    assert out["explained_variance"] > 0.5, out
    assert out["first_pass_stored_tokens"] > 0 and out["first_pass_dropped_tokens"] == 0  # no histogram: all kept
