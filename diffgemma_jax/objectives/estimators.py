"""The Monte-Carlo pieces every diffusion objective's estimator shares, written once.

- the noise levels: `stratified_levels` spreads K levels evenly over [eps, 1] from one uniform offset per row (or
  per block), `stratified_t` one batch's levels from a single offset;
- the bound's draws, keyed by row (`row_keys`, `row_draws`, `row_levels`): every draw of a row's estimate comes from
  the row's own key and the draw's index in the row, so a row's bound is the same whatever rows share its batch and
  however wide the row is padded (the bound keys each row by a hash of its tokens, train/bound.py);
- `mean_and_stderr` of K per-row estimates (the sample standard deviation over sqrt(K): conservative for
  stratified draws);
- the data's state space: `states_excluding` the ids no clean token may be (the mask token), `without` giving them
  zero probability, and `masked_token_nll`, -log p(x) over that space in float32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


# The streams a row's key is split into, one per kind of draw.
T_STREAM, CORRUPT_STREAM, TOKEN_STREAM, RECON_STREAM, RECON_TOKEN_STREAM = range(5)


def stratified_grid(offsets, num: int, eps: float):
  """[num, *offsets.shape]: each offset u gives the levels eps + (1 - eps) * ((u + k / num) mod 1) for k < num,
  evenly spread over [eps, 1]."""
  grid = (jnp.arange(num, dtype=offsets.dtype) / num).reshape((num,) + (1,) * offsets.ndim)
  return eps + (1.0 - eps) * jnp.mod(offsets[None] + grid, 1.0)


def stratified_levels(rng, shape: tuple[int, ...], num: int, eps: float, *, dtype=jnp.float32):
  """[num, *shape] noise levels: each entry of `shape` draws one offset u (`stratified_grid`)."""
  return stratified_grid(jax.random.uniform(rng, shape, dtype), num, eps)


def stratified_t(rng, num: int, eps: float, *, dtype=jnp.float32):
  """t_i = eps + (1 - eps) * ((u + i/num) mod 1): one uniform draw, evenly spread over [eps, 1]."""
  return stratified_levels(rng, (), num, eps, dtype=dtype)


def row_keys(rng, num_rows: int):
  """[B] keys, one per row: `rng` itself when it is already one key per row (the bound's fold_in(seed, row hash)),
  else row b's key is fold_in(rng, b)."""
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  if rng.shape == (num_rows,):
    return rng
  if rng.shape != ():
    raise ValueError(f"one key or one per row ({num_rows}) expected, got keys of shape {rng.shape}")
  return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(num_rows))


def _uniform(key):
  return jax.random.uniform(key)


def row_draws(keys_B, stream: int, sample, length: int, draw=_uniform):
  """[B, length]: entry (b, l) is `draw` (default U[0, 1)) of the key fold_in(fold_in(fold_in(keys_B[b], stream),
  sample), l). A draw depends on its row's key, its stream, its sample and its index only: not on the other rows,
  nor on how many draws the row takes (a row padded wider draws the same for its real tokens)."""
  sample_keys = jax.vmap(lambda key: jax.random.fold_in(jax.random.fold_in(key, stream), sample))(keys_B)
  index = jnp.arange(length)
  return jax.vmap(lambda key: jax.vmap(lambda i: draw(jax.random.fold_in(key, i)))(index))(sample_keys)


def row_levels(keys_B, num_blocks: int, num: int, eps: float):
  """[num, B, num_blocks] noise levels: block n of row b takes offset n of the row's T_STREAM and its `num`
  levels are that offset's `stratified_grid` (one block per row: the row's levels)."""
  return stratified_grid(row_draws(keys_B, T_STREAM, 0, num_blocks), num, eps)


def mean_and_stderr(estimates_KB):
  """Per row, the mean of K estimates and its standard error (std over K, ddof 1, / sqrt(K); 0 for K = 1)."""
  K = estimates_KB.shape[0]
  mean_B = jnp.mean(estimates_KB, axis=0)
  if K > 1:
    return mean_B, jnp.std(estimates_KB, axis=0, ddof=1) / jnp.sqrt(K)
  return mean_B, jnp.zeros_like(mean_B)


def states_excluding(mask_id: int) -> tuple[int, ...]:
  """The ids that no clean token may be: the mask token, or none when the tokenizer has none (the released
  tokenizer: `mask_id = -1`, which must never be taken as an index of the last vocabulary entry)."""
  return (mask_id,) if mask_id >= 0 else ()


def without(logits_BLV, excluded_ids: Sequence[int]):
  """The logits with each of `excluded_ids` (possibly none) given zero probability."""
  for token in sorted(set(excluded_ids)):
    logits_BLV = logits_BLV.at[..., token].set(-jnp.inf)
  return logits_BLV


def masked_token_nll(logits_BLV, tokens_BL, *, mask_id: int):
  """-log p(x_l) per position in float32, with the mask token given zero probability (`mask_id < 0`: a tokenizer
  without one, nothing excluded)."""
  logits_BLV = without(logits_BLV.astype(jnp.float32), states_excluding(mask_id))
  log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_BL = jnp.take_along_axis(logits_BLV, tokens_BL[..., None], axis=-1)[..., 0]
  return log_z_BL - target_BL
