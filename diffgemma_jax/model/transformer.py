"""The Gemma-4-style sparse-MoE denoiser.

Every block: pre-norm attention -> post-attention norm -> residual; then the dense GeGLU ("shared expert") in
parallel with the routed experts, each with its own pre/post norm, summed, a post-FFN norm, residual, and a learned
per-layer scalar. Layers follow `layer_pattern` (sliding / global), repeated; with `scan_layers` one repetition of
the pattern is the scanned unit, its parameters stacked on a leading "layers" axis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from diffgemma_jax.model.attention import Attention
from diffgemma_jax.model.config import ModelConfig
from diffgemma_jax.model.layers import MLP, Embedder, RMSNorm, dtype_of, param, rms_normalize
from diffgemma_jax.model.masks import MaskSpec, canvas_window_starts
from diffgemma_jax.model.moe import MoE
from diffgemma_jax.model.placement import LOCAL, Placement
from diffgemma_jax.model.self_conditioning import SelfConditioning

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole unit
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs, placement: Placement = LOCAL):
    D, eps = cfg.embed_dim, cfg.norm_eps
    self.pre_attn_norm = RMSNorm(D, eps=eps, rngs=rngs)
    self.attn = Attention(cfg, kind, rngs=rngs, placement=placement)
    self.post_attn_norm = RMSNorm(D, eps=eps, rngs=rngs)
    self.pre_mlp_norm = RMSNorm(D, eps=eps, rngs=rngs)
    self.mlp = MLP(D, cfg.mlp_dim, rngs=rngs, lora_rank=cfg.lora_rank if cfg.lora("mlp") else 0,
                   lora_alpha=cfg.lora_alpha)
    self.post_mlp_norm = RMSNorm(D, eps=eps, rngs=rngs)
    self.pre_moe_norm = RMSNorm(D, eps=eps, rngs=rngs)
    self.moe = MoE(cfg, rngs=rngs, placement=placement)
    self.post_moe_norm = RMSNorm(D, eps=eps, rngs=rngs)
    self.post_ffn_norm = RMSNorm(D, eps=eps, rngs=rngs)
    self.layer_scalar = param(rngs, (1,), (None,), init="ones")
    self.placement = placement

  def __call__(self, x_BLD, positions_BL, mask_BLL, token_mask_BL, dtype, canvas_window=None):
    with jax.named_scope("attention"):  # the scopes name the costs in a profile (bench/trace_summary.py)
      attn_out = self.attn(self.pre_attn_norm(x_BLD), positions_BL, mask_BLL, dtype, canvas_window=canvas_window)
    return self._after_attention(x_BLD, attn_out, token_mask_BL, dtype)

  def decode(self, x_BLD, positions_BL, mask_BLS, token_mask_BL, dtype, *, layer_cache, unit, kv_positions_BS,
             write_index, canvas_window=None):
    """Like `__call__`, but the window's keys/values are written into unit `unit` of the stacked cache
    `layer_cache = (k_RBSKH, v_RBSKH)` at slots [write_index, write_index + L) (`write_window`: one index for the
    batch, or one per row), and the window attends to all S cached slots of that unit under `mask_BLS` (and the
    sliding window, by `kv_positions_BS`). Only the window is written into the stacked buffers (in place where the
    caller donates or carries them), never a whole unit's slice. Returns (output, updated layer_cache)."""
    h_BLD = self.pre_attn_norm(x_BLD)
    k_BLKH, v_BLKH = self.attn.project_kv(h_BLD, positions_BL, dtype)
    k_all, v_all = layer_cache
    k_all = write_window(k_all, k_BLKH, write_index, unit)
    v_all = write_window(v_all, v_BLKH, write_index, unit)
    kv = tuple(jax.lax.dynamic_index_in_dim(a, unit, axis=0, keepdims=False).astype(dtype) for a in (k_all, v_all))
    attn_out = self.attn(h_BLD, positions_BL, mask_BLS, dtype, kv=kv, kv_positions_BS=kv_positions_BS,
                         canvas_window=canvas_window)
    out, _ = self._after_attention(x_BLD, attn_out, token_mask_BL, dtype)
    return out, (k_all, v_all)

  def _after_attention(self, x_BLD, attn_out, token_mask_BL, dtype):
    # Rows stay split over the batch axes (and the sequence over `context`) between sublayers (a no-op for the LOCAL
    # placement).
    h_BLD = self.placement.constrain(x_BLD + self.post_attn_norm(attn_out), ("batch", "length", None))
    with jax.named_scope("dense_mlp"):
      dense = self.post_mlp_norm(self.mlp(self.pre_mlp_norm(h_BLD), dtype))
    with jax.named_scope("moe"):
      routed, routing = self.moe(h_BLD, self.pre_moe_norm(h_BLD), dtype, token_mask_BL)
    ffn = self.post_ffn_norm(dense + self.post_moe_norm(routed))
    out = self.placement.constrain((h_BLD + ffn) * self.layer_scalar[...].astype(dtype), ("batch", "length", None))
    stats = {"load_balance_loss": routing.load_balance_loss, "router_z_loss": routing.router_z_loss,
             "expert_load": routing.expert_load_E, "dropped_tokens": jnp.asarray(routing.dropped, jnp.float32)}
    return out, stats


def write_window(buffer, window, write_index, unit=None):
  """`buffer` [(R,) B, S, ...] with `window` [B, L, ...] written at slots [write_index, write_index + L) (of unit
  `unit` of a stacked buffer). `write_index`: a scalar (one slice update, the batch shares it) or [B] int32, each
  row's own first slot (a scatter: rows of a continuously batched cache sit at different slots; they must fit)."""
  window = window.astype(buffer.dtype)
  if jnp.ndim(write_index) == 0:
    if unit is None:
      return jax.lax.dynamic_update_slice_in_dim(buffer, window, write_index, axis=1)
    return jax.lax.dynamic_update_slice(buffer, window[None], (unit, 0, write_index) + (0,) * (window.ndim - 2))
  # One slice update per row, vmapped: a scatter whose row axis is a batching axis, so a buffer split over its
  # rows (a serving engine's slots over the devices) is written where each row lives, with no collective.
  if unit is None:
    return jax.vmap(lambda row, w, i: jax.lax.dynamic_update_slice_in_dim(row, w, i, axis=0))(
        buffer, window, write_index)
  return jax.vmap(lambda row, w, i: jax.lax.dynamic_update_slice(row, w[None], (unit, i) + (0,) * (w.ndim - 1)),
                  in_axes=(1, 0, 0), out_axes=1)(buffer, window, write_index)


class PatternUnit(nnx.Module):
  """One repetition of `layer_pattern`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, placement: Placement = LOCAL):
    self.blocks = nnx.List([Block(cfg, kind, rngs=rngs, placement=placement) for kind in cfg.layer_pattern])

  def __call__(self, x_BLD, positions_BL, mask_BLL, token_mask_BL, dtype, canvas_window=None):
    stats = []
    for block in self.blocks:
      x_BLD, s = block(x_BLD, positions_BL, mask_BLL, token_mask_BL, dtype, canvas_window)
      stats.append(s)
    return x_BLD, jax.tree.map(lambda *xs: jnp.stack(xs), *stats)

  def decode(self, x_BLD, positions_BL, mask_BLS, token_mask_BL, dtype, *, kv_cache, unit, kv_positions_BS,
             write_index, canvas_window=None):
    """`Block.decode` through the pattern as unit `unit` of the stack; `kv_cache` is the whole stacked cache, one
    (k, v) pair per block of the pattern, each [repeats, B, S, K, H]."""
    new_cache = []
    for block, layer_cache in zip(self.blocks, kv_cache):
      x_BLD, layer_cache = block.decode(x_BLD, positions_BL, mask_BLS, token_mask_BL, dtype, layer_cache=layer_cache,
                                        unit=unit, kv_positions_BS=kv_positions_BS, write_index=write_index,
                                        canvas_window=canvas_window)
      new_cache.append(layer_cache)
    return x_BLD, tuple(new_cache)


def _stack_units(units: list[PatternUnit]) -> PatternUnit:
  """Stacks the parameters of identical units on a new leading axis, tagged with the logical axis "layers"."""
  head = units[0]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(u) for u in units])
  nnx.update(head, stacked)
  for _, var in nnx.iter_graph(head):
    if isinstance(var, nnx.Param):
      var.set_metadata("axes", ("layers",) + tuple(var.get_metadata().get("axes", ())))
  return head


class Denoiser(nnx.Module):
  """Maps tokens (clean, masked or noised) to logits over the vocabulary. Knows nothing of objectives; runs where
  `placement` says (`model/placement.py`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, placement: Placement = LOCAL):
    self.cfg = cfg
    self.placement = placement
    self.embedder = Embedder(cfg.vocab_size, cfg.embed_dim, rngs=rngs)
    repeats = cfg.num_layers // len(cfg.layer_pattern)
    units = [PatternUnit(cfg, rngs=rngs, placement=placement) for _ in range(repeats)]
    if cfg.scan_layers:
      self.stacked_unit = _stack_units(units)
      self.units = nnx.List([])
    else:
      self.stacked_unit = None
      self.units = nnx.List(units)
    self.final_norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, rngs=rngs)
    # Optional; objectives that self-condition feed its output in through `embeddings_BLD`.
    self.self_conditioning = SelfConditioning(cfg, rngs=rngs) if cfg.self_conditioning else None

  def _unit_fn(self, graphdef):
    dtype = dtype_of(self.cfg.compute_dtype)

    def apply(state, x_BLD, positions_BL, mask_BLL, token_mask_BL, canvas_window):
      return nnx.merge(graphdef, state)(x_BLD, positions_BL, mask_BLL, token_mask_BL, dtype, canvas_window)

    if self.cfg.remat != "none":
      apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.cfg.remat])
    return apply

  def embed(self, tokens_BL, dtype, *, embeddings_BLD=None, canvas_BL=None):
    """Scaled token embeddings plus `embeddings_BLD`; with `model.canvas_input_norm`, positions where `canvas_BL`
    is True are then RMS-normalised without scale (the released DiffusionGemma's canvas input)."""
    # On a mesh the lookup moves only the rows it reads, never the table (parallel/embedding.py).
    x_BLD = self.embedder.encode(tokens_BL, dtype, self.placement.lookup)
    if embeddings_BLD is not None:
      x_BLD = x_BLD + embeddings_BLD.astype(dtype)
    if self.cfg.canvas_input_norm and canvas_BL is not None:
      x_BLD = jnp.where(canvas_BL[..., None], rms_normalize(x_BLD, self.cfg.norm_eps).astype(dtype), x_BLD)
    return x_BLD

  def __call__(self, tokens_BL, positions_BL, mask_BLL, *, token_mask_BL=None, embeddings_BLD=None, canvas_BL=None):
    """Returns float32 logits [B, L, V] and a dict of router statistics and the weighted auxiliary loss.

    `mask_BLL` is a mask description (`MaskSpec`, what the objectives pass: every `model.attention_impl` takes it)
    or a dense [B, L, L] bool array (computed by the `xla` path).
    `embeddings_BLD`, when given, is added to the scaled token embeddings (self-conditioning enters here).
    `canvas_BL` (bool) marks the canvas (decoder) positions: with `model.canvas_input_norm` their embeddings are
    normalised, and with a dense mask on sliding-window layers a canvas query sees the clean keys within the window
    of its canvas's first position (the reference's decoder over a sliding-window cache; `masks.sliding_window`; a
    MaskSpec carries its canvas itself).
    """
    cfg = self.cfg
    dtype = dtype_of(cfg.compute_dtype)
    if token_mask_BL is None:
      token_mask_BL = jnp.ones(tokens_BL.shape, bool)
    row_mask = mask_BLL
    # The layers may run the row's tokens in another order (load-balanced context parallelism); the logits are in
    # the row's order again.
    (tokens_BL, positions_BL, token_mask_BL, embeddings_BLD, canvas_BL), mask_BLL = self.placement.reorder_row(
        (tokens_BL, positions_BL, token_mask_BL, embeddings_BLD, canvas_BL), mask_BLL)
    with jax.named_scope("embed"):
      x_BLD = self.placement.constrain(self.embed(tokens_BL, dtype, embeddings_BLD=embeddings_BLD,
                                                  canvas_BL=canvas_BL), ("batch", "length", None))
    canvas_window = self._canvas_window(mask_BLL, positions_BL, positions_BL, canvas_BL, canvas_BL)
    if self.stacked_unit is not None:
      graphdef, state = nnx.split(self.stacked_unit)
      apply = self._unit_fn(graphdef)

      def body(x, unit_state):
        return apply(unit_state, x, positions_BL, mask_BLL, token_mask_BL, canvas_window)

      x_BLD, stats = jax.lax.scan(body, x_BLD, state)
      stats = jax.tree.map(lambda s: s.reshape((-1,) + s.shape[2:]), stats)
    else:
      all_stats = []
      for unit in self.units:
        graphdef, state = nnx.split(unit)
        x_BLD, s = self._unit_fn(graphdef)(state, x_BLD, positions_BL, mask_BLL, token_mask_BL, canvas_window)
        all_stats.append(s)
      stats = jax.tree.map(lambda *xs: jnp.concatenate(xs), *all_stats)
    with jax.named_scope("unembed"):
      x_BLD = self.placement.restore_row(x_BLD, row_mask)
      logits_BLV = self.embedder.decode(self.final_norm(x_BLD), self.placement.logits)
      if cfg.logit_softcap > 0:
        logits_BLV = cfg.logit_softcap * jnp.tanh(logits_BLV / cfg.logit_softcap)
    aux = aux_losses(stats, cfg)
    return logits_BLV, aux

  def _canvas_window(self, mask_BLS, positions_BL, kv_positions_BS, canvas_BL, canvas_kv_BS):
    """(window starts [B, L], canvas keys [B, S]) for the sliding layers under a dense mask, or None (no canvas, no
    sliding layer, or a MaskSpec, which finds its canvas starts itself)."""
    if canvas_BL is None or "sliding" not in self.cfg.layer_pattern or isinstance(mask_BLS, MaskSpec):
      return None
    starts_BL = canvas_window_starts(mask_BLS, positions_BL, kv_positions_BS, canvas_BL, canvas_kv_BS)
    return starts_BL, canvas_kv_BS

  # ---- decoding with a KV cache (sampling) -----------------------------------------------------------------------
  def init_kv_cache(self, batch_size: int, max_length: int, dtype=None) -> tuple:
    """Zeroed key/value buffers for `decode`: one (k, v) pair per position of `layer_pattern`, each
    [repeats, B, S, K, H] (repeats = num_layers / len(layer_pattern)); the same layout with or without scan_layers.
    K=V layers still store both: their values are the V-normalised, unrotated keys."""
    cfg = self.cfg
    dtype = dtype or dtype_of(cfg.compute_dtype)
    repeats = cfg.num_layers // len(cfg.layer_pattern)
    cache = []
    for kind in cfg.layer_pattern:
      head_dim, num_kv_heads, _ = cfg.attention_dims(kind)
      shape = (repeats, batch_size, max_length, num_kv_heads, head_dim)
      cache.append((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
    return tuple(cache)

  def decode(self, tokens_BL, positions_BL, mask_BLS, kv_cache, kv_positions_BS, write_index, *,
             logits_start=0, logits_length: int | None = None, embeddings_BLD=None, canvas_BL=None):
    """Runs a window of L tokens through the stack against a KV cache of S slots.

    Every layer writes the window's keys/values at slots [write_index, write_index + L) (`write_index`: a scalar,
    or [B] int32 for rows at different slots, as a continuously batched engine's are) and the window attends to
    all S slots under `mask_BLS` [B, L, S] (the caller masks slots not written yet), or under a MaskSpec whose `kv`
    side describes the S slots; `kv_positions_BS` are the slots' token positions (sliding-window layers under a
    dense mask use them). Only positions [logits_start, logits_start +
    logits_length) of the window are unembedded (`logits_start`: a scalar, or [B] int32 for rows whose last real
    tokens sit at different positions), so no [B, L, V] temporary is made when fewer are needed.
    `embeddings_BLD` and `canvas_BL` are as in `__call__`; the slots this window writes from canvas positions are the
    canvas keys, every other slot is clean.
    Returns (float32 logits [B, logits_length or L, V], the updated cache).
    """
    cfg = self.cfg
    dtype = dtype_of(cfg.compute_dtype)
    token_mask_BL = jnp.ones(tokens_BL.shape, bool)
    x_BLD = self.embed(tokens_BL, dtype, embeddings_BLD=embeddings_BLD, canvas_BL=canvas_BL)
    canvas_kv_BS = None
    if canvas_BL is not None:
      canvas_kv_BS = write_window(jnp.zeros(kv_positions_BS.shape, bool), canvas_BL, write_index)
    canvas_window = self._canvas_window(mask_BLS, positions_BL, kv_positions_BS, canvas_BL, canvas_kv_BS)
    kwargs = dict(kv_positions_BS=kv_positions_BS, write_index=write_index, canvas_window=canvas_window)
    # The stacked cache travels whole (the scan's carry), and each layer writes only its window into it: slicing a
    # unit's cache out and writing it back (or scanning over it as xs / ys) would copy every slot of every layer at
    # every call, a cost growing with batch x cache length.
    if self.stacked_unit is not None:
      graphdef, state = nnx.split(self.stacked_unit)

      def body(carry, unit_state_and_index):
        x, cache = carry
        unit_state, r = unit_state_and_index
        return nnx.merge(graphdef, unit_state).decode(x, positions_BL, mask_BLS, token_mask_BL, dtype,
                                                      kv_cache=cache, unit=r, **kwargs), None

      repeats = jax.tree.leaves(kv_cache)[0].shape[0]
      (x_BLD, kv_cache), _ = jax.lax.scan(body, (x_BLD, kv_cache), (state, jnp.arange(repeats)))
    else:
      for r, unit in enumerate(self.units):
        x_BLD, kv_cache = unit.decode(x_BLD, positions_BL, mask_BLS, token_mask_BL, dtype, kv_cache=kv_cache, unit=r,
                                      **kwargs)
    if logits_length is not None and jnp.ndim(logits_start):  # [B]: each row's own first position
      take_BL = logits_start[:, None] + jnp.arange(logits_length)[None, :]
      x_BLD = jnp.take_along_axis(x_BLD, take_BL[:, :, None], axis=1, mode="clip")
    elif logits_length is not None:
      x_BLD = jax.lax.dynamic_slice_in_dim(x_BLD, logits_start, logits_length, axis=1)
    logits_BLV = self.embedder.decode(self.final_norm(x_BLD), self.placement.logits)
    if cfg.logit_softcap > 0:
      logits_BLV = cfg.logit_softcap * jnp.tanh(logits_BLV / cfg.logit_softcap)
    return logits_BLV, kv_cache


def aux_losses(stats: dict[str, Any], cfg: ModelConfig) -> dict[str, jax.Array]:
  """Averages router statistics over layers and weights the auxiliary losses (zero weight: logged only)."""
  load_balance = jnp.mean(stats["load_balance_loss"])
  z_loss = jnp.mean(stats["router_z_loss"])
  return {
      "load_balance_loss": load_balance,
      "router_z_loss": z_loss,
      "expert_load": stats["expert_load"],  # [num_layers, E]
      "dropped_tokens": jnp.sum(stats["dropped_tokens"]),  # (token, k) assignments expert parallelism dropped
      "aux_loss": cfg.load_balance_loss_weight * load_balance + cfg.router_z_loss_weight * z_loss,
  }


def build_model(cfg: ModelConfig, seed: int | jax.Array = 0, placement: Placement = LOCAL) -> Denoiser:
  rngs = nnx.Rngs(params=seed) if not isinstance(seed, nnx.Rngs) else seed
  return Denoiser(cfg, rngs=rngs, placement=placement)


def abstract_model(cfg: ModelConfig, placement: Placement = LOCAL) -> Denoiser:
  """The denoiser of `cfg` with shapes and dtypes for parameters (nothing allocated): the graphdef and restore
  target of a model built for `placement`."""
  return nnx.eval_shape(lambda: build_model(cfg, 0, placement))
