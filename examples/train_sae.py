"""Train a TopK sparse autoencoder (Gao et al. 2024) on one hook of one layer of an activation
dataset, or a TopK transcoder from a layer's MLP input to its MLP output.

    python examples/train_sae.py OUT --layer 3 --latents 512 --k 8 --steps 2000
    python examples/train_sae.py OUT --layer 3 --hook attn_out
    python examples/train_sae.py OUT --layer 3 --transcoder      # needs --hooks mlp_in mlp_out

Inputs come from llm_activations.reader, shuffled at token level. By default they are the tokens the
readers deliver (norms.py's policy): tokens whose norm exceeds --max-norm-ratio (10) x the layer's
median norm (attention sinks, massive activations) are left out, and the rest are scaled by the
dataset's delivered scaling factor (their mean norm becomes sqrt(hidden)); explained variance is
over those tokens. --max-norm-ratio none keeps every token, scaled by the all-token factor. The SAE is pure JAX over a params dict:

    pre  = (x - b_dec) @ W_enc + b_enc            # [B, L]
    z    = ReLU(TopK(pre, k))                     # k nonzeros per token
    xhat = z @ W_dec + b_dec                      # [B, H], decoder rows kept at unit norm

trained with Adam on the mean squared error. It prints the fraction of variance explained
(1 - sum |x - xhat|^2 / sum |x - mean x|^2 over recent batches) and the share of dead latents
(latents that fired on none of the last --dead-window steps' tokens).

--transcoder (Dunefsky et al. 2024) encodes x = mlp_in and decodes a prediction of y = mlp_out of the
same layer: the same TopK architecture, trained on |y - yhat|^2, reporting the variance of mlp_out
it explains. The two hooks' shards hold the same rows in the same order, and the NumPy reader
shuffles them identically under one seed, so both are read in lockstep; every batch's doc_index
and token_index are compared to prove the pairs are aligned.
--reader numpy (default) never imports TensorFlow, as a JAX-on-TPU trainer would; --reader tf
reads through reader.activation_dataset. Either way batches reach the step through
jax_reader.prefetch_to_device: on the device, one transfer ahead of the trainer.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def batches(path: str, layer: int, batch_size: int, reader: str, shuffle_buffer: int, seed: int, hook: str = "resid_post",
            max_norm_ratio: float | None = None):
    """Endless float32 [batch_size, H] host batches of one hook's delivered tokens (the reader drops
    tokens above max_norm_ratio x the median norm and scales the rest to mean norm sqrt(H)), a
    freshly seeded shuffle per pass."""
    from llm_activations import reader as rd

    kw = dict(shuffle_buffer=shuffle_buffer, hook=hook, normalize=True, max_norm_ratio=max_norm_ratio)
    epoch = 0
    while True:
        if reader == "tf":
            it = rd.activation_dataset(path, layer, batch_size, seed=seed + epoch, **kw).as_numpy_iterator()
        else:
            it = rd.iter_numpy_batches(path, layer, batch_size, seed=seed + epoch, **kw)
        got = False
        for b in it:
            got = True
            yield b
        if not got:
            raise SystemExit(f"{path} {hook} layer {layer} has fewer than --batch-size {batch_size} tokens")
        epoch += 1


def paired_batches(path: str, layer: int, batch_size: int, shuffle_buffer: int, seed: int,
                   source: str = "mlp_in", target: str = "mlp_out", max_norm_ratio: float | None = None):
    """Endless aligned (x [B, H_source], y [B, H_target]) batches of two hooks of one layer, read
    together token for token (reader.iter_numpy_pairs: a pair is dropped when either side is above
    its own threshold; each side is scaled by its own factor)."""
    from llm_activations import reader as rd

    epoch = 0
    while True:
        got = False
        for x, y in rd.iter_numpy_pairs(path, layer, batch_size, hooks=(source, target), shuffle_buffer=shuffle_buffer,
                                        seed=seed + epoch, normalize=True, max_norm_ratio=max_norm_ratio):
            got = True
            yield x, y
        if not got:
            raise SystemExit(f"{path} layer {layer} has fewer than --batch-size {batch_size} tokens")
        epoch += 1


def init_params(key, hidden: int, latents: int, b_dec: np.ndarray, out_width: int | None = None):
    """hidden: input width; out_width: output width (a transcoder's target), default hidden."""
    import jax
    import jax.numpy as jnp

    w = jax.random.normal(key, (latents, out_width or hidden), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    if out_width is None or out_width == hidden:
        # Encoder initialised to the decoder's transpose (Gao et al.): the SAE starts near an identity.
        w_enc = w.T
    else:
        w_enc = jax.random.normal(jax.random.fold_in(key, 1), (hidden, latents), jnp.float32) / np.sqrt(hidden)
    return {"W_enc": w_enc, "b_enc": jnp.zeros(latents), "W_dec": w, "b_dec": jnp.asarray(b_dec, jnp.float32)}


def encode(params, x, k: int, transcoder: bool = False):
    import jax
    import jax.numpy as jnp

    # An SAE subtracts b_dec (its output's mean) from the input; a transcoder's input lives elsewhere.
    pre = (x if transcoder else x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]  # [B, L]
    vals, idx = jax.lax.top_k(pre, k)  # [B, k]
    return jnp.maximum(vals, 0.0), idx


def decode(params, vals, idx):
    import jax.numpy as jnp

    # [B, k] x [B, k, H] -> [B, H]: gather the k active decoder rows instead of a dense [B, L] matmul.
    return jnp.einsum("bk,bkh->bh", vals, params["W_dec"][idx]) + params["b_dec"]


def make_step(k: int, optimizer, transcoder: bool = False):
    """step(params, opt_state, x, y): one Adam step on |y - decode(encode(x))|^2 (an SAE: y = x)."""
    import jax
    import jax.numpy as jnp

    def loss_fn(params, x, y):
        vals, idx = encode(params, x, k, transcoder)
        yhat = decode(params, vals, idx)
        err = jnp.sum((y - yhat) ** 2)
        return err / x.shape[0], (err, vals, idx)

    @jax.jit
    def step(params, opt_state, x, y):
        (loss, (err, vals, idx)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
        w = params["W_dec"]
        params = {**params, "W_dec": w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-8)}
        total = jnp.sum((y - y.mean(axis=0)) ** 2)
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
    hook: str = "resid_post",
    transcoder: bool = False,
    max_norm_ratio: float | None = 10.0,
) -> dict:
    """Train and return {"fve", "dead_fraction", "steps", "tokens", "seconds", "params", "layer", "hook"}.

    transcoder: map mlp_in to mlp_out of `layer` (hook is then "mlp_in->mlp_out"); fve is the
    fraction of mlp_out's variance explained. max_norm_ratio: tokens above that multiple of the
    median norm are left out (None: every token is trained on); fve is over the delivered tokens.
    """
    import jax
    import optax

    from llm_activations import reader as rd
    from llm_activations.errors import UsageError
    from llm_activations.format import metadata as md
    from llm_activations.format import norms as nm
    from llm_activations.jax_reader import prefetch_to_device

    if not (1 <= k <= latents):
        raise UsageError(f"--k {k} must be between 1 and --latents ({latents}): k latents fire per token")
    if steps < 1 or batch_size < 1:
        raise UsageError(f"--steps ({steps}) and --batch-size ({batch_size}) must be positive")
    try:
        nm.check_ratio(max_norm_ratio)
    except ValueError as e:
        raise UsageError(str(e)) from None
    meta = md.read_metadata(path)
    source, target = ("mlp_in", "mlp_out") if transcoder else (hook, hook)
    have = md.entries(meta)
    for h in dict.fromkeys((source, target)):
        if not any(hh == h for hh, _ in have):
            raise UsageError(f"{path} has no {h} activations (it has hooks {', '.join(md.hooks_of(meta))}); "
                             + ("extract with --hooks mlp_in mlp_out for --transcoder" if transcoder else "choose one with --hook"))
    if layer is None:
        layer = min(l for h, l in have if h == target)
    spec_out = rd.layer_spec(path, layer, hook=target)
    spec_in = spec_out if source == target else rd.layer_spec(path, layer, hook=source)

    recent_err, recent_total, fired_steps = [], [], []
    start = time.perf_counter()
    if transcoder:
        if reader != "numpy":
            raise SystemExit("--transcoder reads its aligned pairs with --reader numpy")
        host = paired_batches(path, layer, batch_size, shuffle_buffer, seed, source, target, max_norm_ratio)
    else:
        host = batches(path, layer, batch_size, reader, shuffle_buffer, seed, hook, max_norm_ratio)
    # b_dec starts at the mean of the first batch of what is trained on: the stored all-token mean
    # is pulled towards the sinks and massive activations that the delivered tokens leave out.
    first = next(host)
    b_dec = np.mean(first[1] if transcoder else first, axis=0)
    params = init_params(jax.random.PRNGKey(seed), spec_in.hidden_size, latents, b_dec, spec_out.hidden_size)
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(params)
    step = make_step(k, optimizer, transcoder)
    # On the device one batch ahead of the step (double-buffered device_put): the trainer never
    # waits for a host-to-device copy.
    data = prefetch_to_device(itertools.chain([first], host))
    fve = dead = float("nan")
    for i in range(1, steps + 1):
        x, y = next(data) if transcoder else (next(data),) * 2
        params, opt_state, loss, err, total, fired = step(params, opt_state, x, y)
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
            "seconds": time.perf_counter() - start, "params": params, "layer": layer,
            "hook": f"{source}->{target}" if transcoder else hook}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train a TopK SAE on an activation dataset (JAX + optax).")
    p.add_argument("dataset", help="dataset folder (metadata.json + shards)")
    p.add_argument("--layer", type=int, help="layer to train on (default: the first in the dataset)")
    p.add_argument("--hook", help="hook point to train on (default: resid_post)")
    p.add_argument("--transcoder", action="store_true",
                   help="train a transcoder from mlp_in to mlp_out of --layer (extract with --hooks mlp_in mlp_out)")
    p.add_argument("--latents", type=int, default=512)
    p.add_argument("--k", type=int, default=8, help="active latents per token")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reader", choices=["numpy", "tf"], default="numpy")
    p.add_argument("--shuffle-buffer", type=int, default=1 << 15, help="tokens")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--max-norm-ratio", default="10",
                   help="leave out tokens whose norm exceeds this multiple of the layer's median norm (attention "
                        "sinks, massive activations), as the readers do by default; 'none' keeps every token (default: 10)")
    args = p.parse_args(argv)
    from llm_activations import argtypes
    from llm_activations.errors import UsageError

    try:
        if args.transcoder and args.hook is not None:
            raise UsageError(f"--transcoder maps mlp_in to mlp_out; --hook {args.hook} cannot be combined with it")
        try:
            ratio = argtypes.norm_ratio(args.max_norm_ratio)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--max-norm-ratio: {e}") from None
        out = train(
            args.dataset, args.layer, latents=args.latents, k=args.k, steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, seed=args.seed, reader=args.reader, shuffle_buffer=args.shuffle_buffer, log_every=args.log_every,
            hook=args.hook or "resid_post", transcoder=args.transcoder, max_norm_ratio=ratio,
        )
    except UsageError as e:  # e.g. a --layer the dataset does not have: one line, exit 2
        print(f"train_sae.py: error: {e}", file=sys.stderr)
        return 2
    print(f"layer {out['layer']} {out['hook']}: explained variance {out['fve']:.3f}, dead latents {out['dead_fraction']:.1%}, "
          f"{out['tokens']:,} tokens in {out['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
