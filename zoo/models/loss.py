"""The language-modelling loss on a batch, shared by training and evaluation.

A batch is a dict of [B, T] arrays: `tokens` (inputs), `targets` (the next tokens), `positions`,
`segment_ids` (packed documents) and `weights` (per-token loss weights: 0 masks a token out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
