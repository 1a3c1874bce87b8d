"""Train a sparse autoencoder in PyTorch with SAELens on an llm-activations dataset.

    python examples/train_sae_torch.py OUT --layer 3 [--hook resid_post] [--steps 2000] [--latents 4096]

The data provider is llm_activations.torch_reader.torch_batches: float32 tensors [batch, width],
zero-copy from the NumPy reader, shuffled, normalised so that the delivered tokens' mean norm is
sqrt(width), with massive activations (norm above 10x the median, format/norms.py) dropped by
default. SAELens' SAETrainer takes any iterator of tensors, so one pass after another is chained
here (each pass in a new order). At the end it reports, over held-out delivered tokens, the
explained variance and the dead latents, and the reader's counters (tokens stored, dropped).

dictionary_learning's trainSAE(data=...) takes the same iterator: pass it `batches` below.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from llm_activations import argtypes


def train(path: str, layer: int, *, hook: str = "resid_post", steps: int = 2000, batch_size: int = 4096,
          latents: int = 4096, l1: float = 1.0, lr: float = 3e-4, seed: int = 0, max_norm_ratio: float | None = 10.0) -> dict:
    from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    from llm_activations.reader import layer_spec
    from llm_activations.torch_reader import torch_batches

    width = layer_spec(path, layer, hook=hook).hidden_size
    torch.manual_seed(seed)
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=width, d_sae=latents, l1_coefficient=l1, dtype="float32", device="cpu"))
    kw = dict(hook=hook, normalize=True, max_norm_ratio=max_norm_ratio)
    first = torch_batches(path, layer, batch_size, seed=seed, **kw)

    def batches():  # one pass after another, each in a new order
        yield from first
        for epoch in itertools.count(1):
            yield from torch_batches(path, layer, batch_size, seed=seed + epoch, **kw)

    data = batches()
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size,
                                          lr=lr, lr_end=lr, device="cpu"), sae, data)
    trainer.fit()
    data.close()
    held_out = next(iter(torch_batches(path, layer, min(batch_size, 8192), seed=seed + 10_000, **kw)))
    with torch.no_grad():
        feats = sae.encode(held_out)
        recon = sae.decode(feats)
    resid = ((held_out - recon) ** 2).sum()
    total = ((held_out - held_out.mean(0)) ** 2).sum()
    stats = first.stats
    return {
        "steps": trainer.n_training_steps,
        "explained_variance": float(1 - resid / total),
        "dead_latents": float((feats > 0).sum(0).eq(0).float().mean()),
        "l0": float((feats > 0).sum(-1).float().mean()),
        "first_pass_stored_tokens": stats.stored_tokens,
        "first_pass_dropped_tokens": stats.dropped_tokens,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("path")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--hook", default="resid_post")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--l1", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-norm-ratio", type=argtypes.norm_ratio, default="10",
                   help="drop tokens above this x the layer's median norm, as the readers do; 'none' keeps every token")
    a = p.parse_args(argv)
    result = train(a.path, a.layer, hook=a.hook, steps=a.steps, batch_size=a.batch_size, latents=a.latents, l1=a.l1,
                   lr=a.lr, seed=a.seed, max_norm_ratio=a.max_norm_ratio)
    for k, v in result.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")


if __name__ == "__main__":
    main()
