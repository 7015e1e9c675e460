"""The LLaMA-family decoder in Flax NNX.

One implementation serves LLaMA 1/2/3.x, CodeLlama, TinyLlama, Mistral (sliding window), Qwen2
(q/k/v bias), Qwen3 (q/k norms), Mixtral and Qwen3-MoE (sparse MoE) and Llama 4 (MoE with a
shared expert, chunked attention, NoPE layers); `LlamaConfig` (zoo/models/config.py) says which parts are
on, and `zoo/models/presets.py` holds the public sizes. Parameter paths follow HF without the
`model.` prefix (`layers.0.self_attn.q_proj.kernel`), so conversion is a table plus transposes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from zoo.errors import ZooError
from zoo.layers.attention import Attention
from zoo.layers.linear import Embed, Linear, after
from zoo.layers.mlp import MLP
from zoo.layers.moe import SparseMoE
from zoo.layers.norm import RMSNorm
from zoo.layers.rope import rope_cos_sin
from zoo.models.config import LlamaConfig, RopeScaling
from zoo.models.presets import PRESETS, get_preset
from zoo.models import stack
from zoo.models.stack import LAYER_AXIS, scan_period
from zoo.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The activations a decoder layer names (jax.ad_checkpoint.checkpoint_name) for the policies
# that keep only those: the attention's q, k, v and output projections and the MLP's input.
SAVEABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp_input")
# What a rematerialised decoder layer keeps for the backward pass ("full" on the CPU is
# `recompute`, below).
REMAT_POLICIES = {
  "none": None,  # no remat: keep everything
  "full": jax.checkpoint_policies.nothing_saveable,  # only the layer's input
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "save_qkvo": jax.checkpoint_policies.save_only_these_names(*SAVEABLE),
  # the same activations, kept in the host's memory until the backward pass (TPU, GPU)
  "offload_qkvo": jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[], names_which_can_be_offloaded=list(SAVEABLE),
      offload_src="device", offload_dst="pinned_host"),
}
# How remat is done: "checkpoint" (jax.checkpoint with the policy; XLA keeps its barriers on
# TPU and GPU) or "custom_vjp" (XLA:CPU drops those barriers and merges the recomputation into
# the forward pass, so remat "full" is `recompute` there); "auto" picks by jax's backend.
REMAT_IMPLS = ("auto", "checkpoint", "custom_vjp")


def check_remat(remat: str) -> None:
  if remat not in REMAT_POLICIES:
    raise ZooError(f"unknown remat policy {remat!r}; use one of {', '.join(REMAT_POLICIES)}")


def as_dtype(dtype):
  """A JAX dtype from a name ('bfloat16') or a dtype; None stays None."""
  if dtype is None or not isinstance(dtype, str):
    return dtype
  if dtype not in DTYPES:
    raise ZooError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
  return DTYPES[dtype]


class DecoderLayer(nnx.Module):

  def __init__(self, config: LlamaConfig, layer: int, *, dtype, param_dtype,
               attention_impl=None, moe_impl="ragged", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.num_experts = config.num_experts
    self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs, **kw)
    self.self_attn = Attention(config, layer, implementation=attention_impl, rngs=rngs, **kw)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs,
                                            **kw)
    if config.is_moe_layer(layer):
      self.block_sparse_moe = SparseMoE(config, implementation=moe_impl, rngs=rngs, **kw)
    else:
      self.mlp = MLP(config, rngs=rngs, **kw)

  def __call__(self, x, cos, sin, segment_ids=None, cache=None, positions=None,
               token_positions=None, router_mask=None):
    """The layer's output; with `router_mask` [B, T] (training with the load-balancing loss),
    (output, the MoE block's routing statistics, zeros for a dense layer)."""
    ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
    if positions is None:
      x = x + self.self_attn(self.input_layernorm(x), cos, sin, segment_ids,
                             token_positions=token_positions)
      h = checkpoint_name(self.post_attention_layernorm(x), "mlp_input")
      if router_mask is None:
        return x + ffn(h)
      if not hasattr(self, "block_sparse_moe"):
        return x + ffn(h), jnp.zeros(2 * self.num_experts + 1, jnp.float32)
      out, stats = ffn(h, router_mask)
      return x + out, stats
    h, new = self.self_attn(self.input_layernorm(x), cos, sin, cache=cache, positions=positions)
    x = x + h
    return x + ffn(self.post_attention_layernorm(x)), new


class Llama(nnx.Module):
  """A causal language model: tokens [B, T] -> logits [B, T, vocab].

  `dtype` is the compute dtype and `param_dtype` the storage dtype of the parameters, chosen
  separately (f32 params with bf16 compute, or bf16 everywhere).

  scan_layers: hold the decoder layers stacked on a leading axis (`stack.{j}`, see
  zoo/models/stack.py) and run them with one `jax.lax.scan`, so the compiled program holds one
  group of layers whatever the depth; the layers are drawn from `rngs` in the same order as
  unrolled ones, so both layouts start from the same weights.
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl=None, moe_impl="ragged", remat="none", remat_impl="auto",
               scan_layers=False, rngs: nnx.Rngs):
    dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
    check_remat(remat)
    if remat_impl not in REMAT_IMPLS:
      raise ZooError(f"unknown remat_impl {remat_impl!r}; use one of {', '.join(REMAT_IMPLS)}")
    if remat_impl == "auto":
      remat_impl = "custom_vjp" if jax.default_backend() == "cpu" else "checkpoint"
    self.config = config
    self.dtype = dtype
    self.remat = remat
    self.remat_impl = remat_impl
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embed_tokens = Embed(config.vocab_size, config.hidden_size,
                              std=config.initializer_range, rngs=rngs, **kw)
    layers = [DecoderLayer(config, i, attention_impl=attention_impl, moe_impl=moe_impl,
                           rngs=rngs, **kw) for i in range(config.num_layers)]
    self.scan_layers = bool(scan_layers)
    if self.scan_layers:
      period = scan_period(config)
      if period is None:
        raise ZooError("scan_layers: the model's layers differ and do not repeat in a group "
                       "(per-layer windows); run them unrolled (scan_layers False)")
      self.stack = nnx.List([stack_modules(layers[j::period]) for j in range(period)])
    else:
      self.layers = nnx.List(layers)
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs, **kw)
    if not config.tie_word_embeddings:
      self.lm_head = Linear(config.hidden_size, config.vocab_size, ("embed", "vocab"),
                            std=config.initializer_range, rngs=rngs, **kw)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, vocab] in the compute dtype.

    positions: [B, T] token positions (default 0..T-1); for packed rows they restart at each
    document. segment_ids: [B, T] document ids; attention never crosses a document boundary.
    """
    return self.head(self.hidden_states(tokens, positions, segment_ids))

  def hidden_states(self, tokens: jax.Array, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None, router_stats: bool = False):
    """The last layer's output [B, T, D], before the final norm and the head (`head`).

    router_stats: also return the MoE layers' routing statistics summed over the layers and
    the real tokens (segment id > 0), for `zoo.layers.moe.load_balancing_loss`.
    """
    _, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
    cos, sin = rope_cos_sin(self.config, positions, self.dtype)
    # only the NoPE layers' temperature reads the positions themselves
    token_positions = positions if self.config.attn_temperature_tuning else None
    router_mask = None
    if router_stats:
      router_mask = (jnp.ones(tokens.shape, jnp.float32) if segment_ids is None
                     else (segment_ids > 0).astype(jnp.float32))
    x = constrain(self.embed_tokens(tokens), ("batch", "length", "embed"))  # [B, T, D]
    stats = jnp.zeros(2 * self.config.num_experts + 1, jnp.float32)
    run = _apply_layer
    if self.remat == "full" and self.remat_impl == "custom_vjp":
      run = recompute
    elif self.remat != "none":
      run = nnx.remat(_apply_layer, policy=REMAT_POLICIES[self.remat])
    def apply(layer, x, stats):
      out = run(layer, x, cos, sin, segment_ids, token_positions, router_mask)
      if router_mask is not None:
        out, layer_stats = out
        stats = stats + layer_stats
      return constrain(out, ("batch", "length", "embed")), stats

    if not self.scan_layers:
      for layer in self.layers:
        x, stats = apply(layer, x, stats)
      return (x, stats) if router_stats else x
    parts = [nnx.split(m) for m in self.stack]

    def group(carry, states):  # one step of the scan: the p layers of one slot, in order
      for (graphdef, _), state in zip(parts, states):
        carry = apply(nnx.merge(graphdef, state), *carry)
      return carry, None

    (x, stats), _ = jax.lax.scan(group, (x, stats), [state for _, state in parts])
    return (x, stats) if router_stats else x

  def decoder_layers(self) -> list[DecoderLayer]:
    """The decoder layers in order, as modules (a stacked model's sliced out of its stacks)."""
    if not self.scan_layers:
      return list(self.layers)
    parts = [nnx.split(m) for m in self.stack]
    slots = len(jax.tree.leaves(parts[0][1])[0])
    return [nnx.merge(graphdef, jax.tree.map(lambda a: a[g], state))
            for g in range(slots) for graphdef, state in parts]

  def head(self, x: jax.Array) -> jax.Array:
    """Logits [..., vocab] of the last layer's hidden states x [..., D] (final norm included)."""
    x = self.norm(x)
    if self.config.tie_word_embeddings:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    return constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits

  def decode(self, tokens: jax.Array, positions: jax.Array, cache: list[dict] | None
             ) -> tuple[jax.Array, list[dict]]:
    """Hidden states [B, T, D] (before the final norm) of tokens [B, T] at `positions`
    (consecutive in each row) that follow the tokens in the KV cache (one {"k", "v"} per layer,
    or None when there are none), and the new tokens' keys and values for
    `zoo.layers.attention.write_cache`. A token's cache slot is its position."""
    cos, sin = rope_cos_sin(self.config, positions, self.dtype)
    x = constrain(self.embed_tokens(tokens), ("batch", "length", "embed"))
    new = []
    for i, layer in enumerate(self.decoder_layers()):
      x, kv = layer(x, cos, sin, cache=None if cache is None else cache[i], positions=positions)
      x = constrain(x, ("batch", "length", "embed"))
      new.append(kv)
    return x, new

  def logits(self, tokens) -> np.ndarray:
    """float32 logits [B, T, vocab] as a numpy array, for int tokens [B, T]."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
      raise ZooError(f"tokens must be an integer array [batch, length], got {tokens.dtype} "
                     f"{tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
      raise ZooError(f"token ids must be in 0..{self.config.vocab_size - 1}")
    dynamic = self.config.rope_scaling and self.config.rope_scaling.rope_type == "dynamic"
    if tokens.shape[1] > self.config.max_position_embeddings and not dynamic:
      raise ZooError(f"sequence length {tokens.shape[1]} exceeds the model's maximum of "
                     f"{self.config.max_position_embeddings}")
    return np.asarray(_logits_f32(self, jnp.asarray(tokens, jnp.int32)))


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
  """One module like `modules[0]` whose variables hold those of every module in `modules`
  stacked on a new leading axis, logically named "layers" (for the sharding rules)."""
  graphdef, _ = nnx.split(modules[0])
  flats = [nnx.to_flat_state(nnx.split(m)[1]) for m in modules]
  stacked = []
  for i, (path, var) in enumerate(flats[0]):
    value = jnp.stack([flat[i][1].get_value() for flat in flats])
    names = var.get_metadata().get("out_sharding") or (None,) * (value.ndim - 1)
    stacked.append((path, var.replace(value, out_sharding=(LAYER_AXIS, *names))))
  return nnx.merge(graphdef, nnx.from_flat_state(stacked))


def _apply_layer(layer, x, cos, sin, segment_ids, token_positions=None, router_mask=None):
  return layer(x, cos, sin, segment_ids, token_positions=token_positions,
               router_mask=router_mask)


def _zero_cotangent(a):
  if jnp.issubdtype(a.dtype, jnp.inexact):
    return jnp.zeros_like(a)
  return np.zeros(a.shape, jax.dtypes.float0)


def recompute(layer, x, cos, sin, segment_ids, token_positions=None, router_mask=None):
  """`layer(x, cos, sin, segment_ids, token_positions=..., router_mask=...)`, keeping only its inputs for the backward pass, which
  runs the layer again to get its gradients (remat "full").

  `jax.checkpoint` marks its recomputation with optimization barriers, which XLA:CPU removes
  and then merges the recomputation with the forward pass, keeping every intermediate. Here the
  backward pass recomputes from inputs tied to the incoming gradient (`after`), which XLA can
  neither hoist nor merge, so a step holds one layer's intermediates at a time on every backend.
  """
  graphdef, state = nnx.split(layer)
  flat, tree = jax.tree.flatten((state, x, cos, sin, segment_ids, token_positions,
                                 router_mask))
  n_state = len(jax.tree.leaves(state))
  inexact = [jnp.issubdtype(a.dtype, jnp.inexact) for a in flat]

  def apply(flat):
    state, x, cos, sin, segment_ids, token_positions, router_mask = jax.tree.unflatten(tree,
                                                                                      flat)
    return nnx.merge(graphdef, state)(x, cos, sin, segment_ids, token_positions=token_positions,
                                      router_mask=router_mask)

  @jax.custom_vjp
  def run(flat):
    return apply(flat)

  def forward(flat):
    return apply(flat), flat

  def backward(flat, g):
    zero = after(jax.tree.leaves(g)[0])
    # the activations start the recomputation; weights are read as they are (a quantized one
    # is tied to its input inside `quantized_matmul`)
    flat = [a + zero.astype(a.dtype) if i >= n_state and inexact[i] else a
            for i, a in enumerate(flat)]
    picked = [i for i, d in enumerate(inexact) if d]

    def partial(values):
      full = list(flat)
      for i, v in zip(picked, values, strict=True):
        full[i] = v
      return apply(full)

    _, vjp = jax.vjp(partial, [flat[i] for i in picked])
    (grads,) = vjp(g)
    out = [_zero_cotangent(a) for a in flat]
    for i, grad in zip(picked, grads, strict=True):
      out[i] = grad
    return (out,)

  run.defvjp(forward, backward)
  return run(flat)


@nnx.jit
def _logits_f32(model: Llama, tokens):
  return model(tokens).astype(jnp.float32)


def abstract_model(config: LlamaConfig, **kwargs) -> Llama:
  """The model with shape-only parameters: no memory, no compute; for loading and sharding."""
  return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), **kwargs))


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """Dotted parameter path -> shape, straight from the module tree."""
  _, state = nnx.split(abstract_model(config))
  return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def from_params(config: LlamaConfig, params: dict[str, np.ndarray], *, dtype=jnp.float32,
                param_dtype=None, **kwargs) -> Llama:
  """A model whose parameters are `params` (dotted path -> array), cast to `param_dtype`.

  param_dtype None keeps each array's own dtype. `params` name layers one by one (the file
  layout) or stacked; with scan_layers=True per-layer names are stacked here.
  """
  model = abstract_model(config, dtype=dtype, param_dtype=param_dtype or jnp.float32, **kwargs)
  if model.scan_layers and not any(stack.is_stacked(n) for n in params):
    params = stack.stack(params, scan_period(config))
  graphdef, state = nnx.split(model)
  flat = nnx.to_flat_state(state)
  missing = []
  for path, var in flat:
    name = ".".join(map(str, path))
    if name not in params:
      missing.append(name)
      continue
    value = params[name]
    if tuple(value.shape) != tuple(var.shape):
      raise ZooError(f"parameter {name} has shape {tuple(value.shape)}, expected "
                     f"{tuple(var.shape)}")
    var.set_value(jnp.asarray(value, dtype=as_dtype(param_dtype) or value.dtype))
  if missing:
    raise ZooError(f"checkpoint is missing parameter {missing[0]}")
  extra = sorted(set(params) - {".".join(map(str, p)) for p, _ in flat})
  if extra:
    raise ZooError(f"checkpoint has unexpected parameter {extra[0]}")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def params_of(model: Llama) -> dict[str, jax.Array]:
  """Dotted parameter path -> array."""
  _, state = nnx.split(model)
  return {".".join(map(str, path)): v.get_value() for path, v in nnx.to_flat_state(state)}


__all__ = ["Llama", "LlamaConfig", "RopeScaling", "PRESETS", "get_preset", "abstract_model",
           "param_shapes", "from_params", "params_of", "as_dtype"]
