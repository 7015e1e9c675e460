"""The language-modelling loss on a batch, shared by training and evaluation.

A batch is a dict of [B, T] arrays: `tokens` (inputs), `targets` (the next tokens), `positions`,
`segment_ids` (packed documents) and `weights` (per-token loss weights: 0 masks a token out).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from zoo.errors import ZooError

Batch = dict[str, jax.Array]
# The dtype of each batch array, as zoo.data.pipeline yields them.
BATCH_DTYPES = {"tokens": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
                "segment_ids": jnp.int32, "weights": jnp.float32}


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token negative log-likelihood and log-partition, both float32 [B, T]."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logit, log_z


def loss_sums(logits: jax.Array, batch: Batch, z_loss: float = 0.0
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(objective sum, nll sum, weight sum) of `logits` [B, T, V] against the batch's targets:
  sums, not means, so that microbatches and devices add up before one division."""
  nll, log_z = token_losses(logits, batch["targets"])
  w = batch["weights"].astype(jnp.float32)
  nll_sum = jnp.sum(nll * w)
  objective = nll_sum + z_loss * jnp.sum(jnp.square(log_z) * w)
  return objective, nll_sum, jnp.sum(w)


def byte_sum(batch: Batch, token_bytes: jax.Array) -> jax.Array:
  """The UTF-8 bytes of text the weighted targets stand for (`token_bytes` [V]: each token's
  length in bytes, 0 for control tokens): the denominator of bits per byte."""
  return jnp.sum(token_bytes[batch["targets"]].astype(jnp.float32)
                 * batch["weights"].astype(jnp.float32))


def chunk_sums(fn: Callable, hidden: jax.Array, extras: tuple, chunk: int = 0):
  """fn(hidden, *extras), a tree of sums over the tokens, computed `chunk` tokens of each row
  at a time: hidden [B, T, D] and each of `extras` [B, T, ...] are cut along T, a scan adds
  the chunks' results, and the backward pass computes each chunk again, so that one chunk's
  logits exist at a time. chunk 0 (or one that covers the row) is one call."""
  b, t = hidden.shape[:2]
  if not chunk or chunk >= t:
    return fn(hidden, *extras)
  if t % chunk:
    raise ZooError(f"the loss chunk ({chunk} tokens) must divide the sequence length ({t})")
  n = t // chunk

  def split(x):  # [B, T, ...] -> [n, B, chunk, ...]
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

  one = jax.checkpoint(fn)
  shapes = jax.eval_shape(one, *(x[:, :chunk] for x in (hidden, *extras)))

  def body(sums, xs):
    return jax.tree.map(jnp.add, sums, one(*xs)), None

  zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  sums, _ = jax.lax.scan(body, zero, tuple(split(x) for x in (hidden, *extras)))
  return sums


def chunked_loss_sums(head: Callable[[jax.Array], jax.Array], hidden: jax.Array, batch: Batch,
                      z_loss: float = 0.0, chunk: int = 0
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`loss_sums(head(hidden), batch, z_loss)` without the whole [B, T, V] logits: `head` maps
  hidden states [B, c, D] to logits, `chunk` (c) tokens of each row at a time (`chunk_sums`).
  At 8B scale one 8192-token row's float32 logits over a 128k vocabulary are 4.2 GB. chunk 0
  (or one that covers the row) is the plain computation."""
  def sums(h, targets, weights):
    return loss_sums(head(h), {"targets": targets, "weights": weights}, z_loss)
  return chunk_sums(sums, hidden, (batch["targets"], batch["weights"]), chunk)
