"""Train a TopK sparse autoencoder (Gao et al. 2024) on one layer of an activation dataset.

    python examples/train_sae.py OUT --layer 3 --latents 512 --k 8 --steps 2000

Inputs come from llm_activations.reader, normalised by the dataset's stored scaling factor (mean
token norm sqrt(hidden)), shuffled at token level. The SAE is pure JAX over a params dict:

    pre  = (x - b_dec) @ W_enc + b_enc            # [B, L]
    z    = ReLU(TopK(pre, k))                     # k nonzeros per token
    xhat = z @ W_dec + b_dec                      # [B, H], decoder rows kept at unit norm

trained with Adam on the mean squared error. It prints the fraction of variance explained
(1 - sum |x - xhat|^2 / sum |x - mean x|^2 over recent batches) and the share of dead latents
(latents that fired on none of the last --dead-window steps' tokens).
--reader numpy (default) never imports TensorFlow, as a JAX-on-TPU trainer would; --reader tf
reads through reader.activation_dataset.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def batches(path: str, layer: int, batch_size: int, reader: str, shuffle_buffer: int, seed: int):
    """Endless float32 [batch_size, H] batches, a freshly seeded shuffle per pass."""
    from llm_activations import reader as rd

    epoch = 0
    while True:
        if reader == "tf":
            ds = rd.activation_dataset(path, layer, batch_size, shuffle_buffer=shuffle_buffer, seed=seed + epoch, normalize=True)
            it = ds.as_numpy_iterator()
        else:
            it = rd.iter_numpy_batches(path, layer, batch_size, shuffle_buffer=shuffle_buffer, seed=seed + epoch, normalize=True)
        got = False
        for b in it:
            got = True
            yield b
        if not got:
            raise SystemExit(f"{path} layer {layer} has fewer than --batch-size {batch_size} tokens")
        epoch += 1


def init_params(key, hidden: int, latents: int, b_dec: np.ndarray):
    import jax
    import jax.numpy as jnp

    w = jax.random.normal(key, (latents, hidden), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    # Encoder initialised to the decoder's transpose (Gao et al.): the SAE starts near an identity.
    return {"W_enc": w.T, "b_enc": jnp.zeros(latents), "W_dec": w, "b_dec": jnp.asarray(b_dec, jnp.float32)}


def encode(params, x, k: int):
    import jax
    import jax.numpy as jnp

    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]  # [B, L]
    vals, idx = jax.lax.top_k(pre, k)  # [B, k]
    return jnp.maximum(vals, 0.0), idx


def decode(params, vals, idx):
    import jax.numpy as jnp

    # [B, k] x [B, k, H] -> [B, H]: gather the k active decoder rows instead of a dense [B, L] matmul.
    return jnp.einsum("bk,bkh->bh", vals, params["W_dec"][idx]) + params["b_dec"]


def make_step(k: int, optimizer):
    import jax
    import jax.numpy as jnp

    def loss_fn(params, x):
        vals, idx = encode(params, x, k)
        xhat = decode(params, vals, idx)
        err = jnp.sum((x - xhat) ** 2)
        return err / x.shape[0], (err, vals, idx)

    @jax.jit
    def step(params, opt_state, x):
        (loss, (err, vals, idx)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        w = params["W_dec"]
        params = {**params, "W_dec": w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-8)}
        total = jnp.sum((x - x.mean(axis=0)) ** 2)
        fired = jnp.zeros(w.shape[0], bool).at[idx.reshape(-1)].max((vals > 0).reshape(-1))
        return params, opt_state, loss, err, total, fired

    return step


def train(
    path: str,
    layer: int | None = None,
    *,
    latents: int = 512,
    k: int = 8,
    steps: int = 1000,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    reader: str = "numpy",
    shuffle_buffer: int = 1 << 15,
    dead_window: int = 100,
    log_every: int = 100,
    log=print,
) -> dict:
    """Train and return {"fve", "dead_fraction", "steps", "tokens", "seconds", "params"}."""
    import jax
    import optax

    from llm_activations.format import metadata as md
    from llm_activations import reader as rd

    meta = md.read_metadata(path)
    if layer is None:
        layer = min(int(key) for key in meta["files"])
    spec = rd.layer_spec(path, layer)
    stats = meta.get("stats", {}).get(str(layer), {})
    b_dec = np.asarray(stats.get("mean", np.zeros(spec.hidden_size)), np.float32) * float(spec.scaling_factor or 1.0)
    params = init_params(jax.random.PRNGKey(seed), spec.hidden_size, latents, b_dec)
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)
    step = make_step(k, optimizer)

    recent_err, recent_total, fired_steps = [], [], []
    start = time.perf_counter()
    data = batches(path, layer, batch_size, reader, shuffle_buffer, seed)
    fve = dead = float("nan")
    for i in range(1, steps + 1):
        x = next(data)
        params, opt_state, loss, err, total, fired = step(params, opt_state, x)
        recent_err.append(err)
        recent_total.append(total)
        fired_steps.append(fired)
        recent_err, recent_total, fired_steps = recent_err[-50:], recent_total[-50:], fired_steps[-dead_window:]
        if i % log_every == 0 or i == steps:
            fve = 1.0 - float(np.sum(recent_err)) / float(np.sum(recent_total))
            dead = 1.0 - float(np.mean(np.any(np.stack(fired_steps), axis=0)))
            log(f"step {i:>6}  loss {float(loss):9.4f}  explained variance {fve:6.3f}  dead latents {dead:6.1%}  "
                f"{i * batch_size / (time.perf_counter() - start):,.0f} tokens/s")
    return {"fve": fve, "dead_fraction": dead, "steps": steps, "tokens": steps * batch_size,
            "seconds": time.perf_counter() - start, "params": params, "layer": layer}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train a TopK SAE on an activation dataset (JAX + optax).")
    p.add_argument("dataset", help="dataset folder (metadata.json + shards)")
    p.add_argument("--layer", type=int, help="layer to train on (default: the first in the dataset)")
    p.add_argument("--latents", type=int, default=512)
    p.add_argument("--k", type=int, default=8, help="active latents per token")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reader", choices=["numpy", "tf"], default="numpy")
    p.add_argument("--shuffle-buffer", type=int, default=1 << 15, help="tokens")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    args = p.parse_args(argv)
    from llm_activations.errors import UsageError

    try:
        out = train(
            args.dataset, args.layer, latents=args.latents, k=args.k, steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, seed=args.seed, reader=args.reader, shuffle_buffer=args.shuffle_buffer, log_every=args.log_every,
        )
    except UsageError as e:  # e.g. a --layer the dataset does not have: one line, exit 2
        print(f"train_sae.py: error: {e}", file=sys.stderr)
        return 2
    print(f"layer {out['layer']}: explained variance {out['fve']:.3f}, dead latents {out['dead_fraction']:.1%}, "
          f"{out['tokens']:,} tokens in {out['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
