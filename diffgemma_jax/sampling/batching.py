"""Batches of prompts of different lengths: left-padded rows with per-row positions, and per-row random keys.

A batch of prompts is one [B, P] array, P the longest prompt, each prompt right-aligned (left padding): row r's
prompt occupies slots [start_r, P) and every row generates into the same slots [P, P + G), so one write index
serves the whole batch (the KV cache, the canvases, the while loops stay shared). Row r's token in slot s sits at
position s - start_r, the position it has when the row is run alone, and no query ever attends to a padding slot
(`real_slots` is ANDed into every attention mask), so a row's logits do not depend on its padding or on the other
rows: batched generation equals one request at a time up to the float rounding of a longer reduction.

Per-row keys: samplers accept one key (every draw of the batch from it, as before) or a [B] array of keys, one per
row. With row keys each row's draws come from its own key alone, so a request's sample depends on its prompt and
seed, never on the rest of the batch; a one-row batch with key k draws exactly what one key k draws.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffgemma_jax.model.masks import MaskSpec, Tokens


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
  """(tokens [B, P] int32, starts [B] int32): each prompt right-aligned after `pad_id`s, P the longest prompt (or
  `width`, at least that)."""
  if not prompts or min(len(p) for p in prompts) < 1:
    raise ValueError("left_pad needs at least one prompt and no empty prompt")
  width = max([len(p) for p in prompts] + ([width] if width else []))
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  starts = np.asarray([width - len(p) for p in prompts], np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, starts[row]:] = prompt
  return tokens, starts


def slot_positions(batch_size: int, num_slots: int, starts_B=None):
  """[B, S] int32 token positions of the slots: s - start_r on real slots, 0 on padding (never attended)."""
  slots_BS = jnp.broadcast_to(jnp.arange(num_slots, dtype=jnp.int32), (batch_size, num_slots))
  if starts_B is None:
    return slots_BS
  return jnp.maximum(slots_BS - starts_B[:, None].astype(jnp.int32), 0)


def real_slots(batch_size: int, num_slots: int, starts_B=None):
  """[B, S] bool: slots at or after each row's start (what queries may attend to)."""
  if starts_B is None:
    return jnp.ones((batch_size, num_slots), bool)
  return jnp.arange(num_slots)[None, :] >= starts_B[:, None]


def slot_mask(batch_size: int, num_slots: int, start, length: int, starts_B=None, *, causal: bool = True,
              written_end=None) -> MaskSpec:
  """The description of a window of `length` queries at slots [start, start + length) over a cache of `num_slots`
  slots: each real query sees the real slots written so far (below `written_end`, default the window's end), up to
  its own slot if `causal`. No [B, L, S] array is made, so a long prompt's pass runs through the fused attention
  (`model.attention_impl`: Pallas on a GPU, query chunks elsewhere). For real queries it is the dense mask
  `(slot_k <= slot_q if causal) & real_k & (slot_k < written_end)` exactly; padding queries (segment 0) see the
  padding instead of nothing, which only the padding's own slots (never read) carry."""
  positions_BS = slot_positions(batch_size, num_slots, starts_B)
  real_BS = real_slots(batch_size, num_slots, starts_B)
  end = start + length if written_end is None else written_end
  written_BS = real_BS & (jnp.arange(num_slots)[None, :] < end)
  query = lambda x: jax.lax.dynamic_slice_in_dim(x, start, length, axis=1)  # noqa: E731
  keys = Tokens(written_BS.astype(jnp.int32), positions_BS)
  queries = Tokens(query(real_BS).astype(jnp.int32), query(positions_BS))
  return MaskSpec(queries, keys, kind="causal" if causal else "bidirectional")


# ---- per-row random keys ---------------------------------------------------------------------------------------
def row_keys(seeds: Sequence[int]):
  """One key per row: `jax.random.key(seed)` of each row's seed."""
  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def split_keys(rng, num: int = 2) -> tuple:
  """`jax.random.split(rng, num)` as a tuple, per row when `rng` holds one key per row."""
  if rng.ndim == 0:
    return tuple(jax.random.split(rng, num))
  keys_BN = jax.vmap(lambda key: jax.random.split(key, num))(rng)
  return tuple(keys_BN[:, i] for i in range(num))


def draw(sample: Callable, rng, shape: tuple[int, ...]):
  """`sample(key, shape)`, or with one key per row `sample(row key, shape[1:])` for each row (shape[0] rows)."""
  if rng.ndim == 0:
    return sample(rng, shape)
  if rng.shape != shape[:1]:
    raise ValueError(f"{rng.shape[0]} row keys for a batch of {shape[0]} rows")
  return jax.vmap(lambda key: sample(key, shape[1:]))(rng)
