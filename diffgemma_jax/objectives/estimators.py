"""The Monte-Carlo pieces every diffusion objective's estimator shares, written once.

- the noise levels: `stratified_levels` spreads K levels evenly over [eps, 1] from one uniform offset per row (or
  per block), `stratified_t` one batch's levels from a single offset;
- `mean_and_stderr` of K per-row estimates (the sample standard deviation over sqrt(K): conservative for
  stratified draws);
- the data's state space: `states_excluding` the ids no clean token may be (the mask token), `without` giving them
  zero probability, and `masked_token_nll`, -log p(x) over that space in float32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def stratified_levels(rng, shape: tuple[int, ...], num: int, eps: float, *, dtype=jnp.float32):
  """[num, *shape] noise levels: each entry of `shape` draws one offset u, and its levels are
  eps + (1 - eps) * ((u + k / num) mod 1) for k < num, evenly spread over [eps, 1]."""
  offsets = jax.random.uniform(rng, shape, dtype)
  grid = (jnp.arange(num, dtype=dtype) / num).reshape((num,) + (1,) * len(shape))
  return eps + (1.0 - eps) * jnp.mod(offsets[None] + grid, 1.0)


def stratified_t(rng, num: int, eps: float, *, dtype=jnp.float32):
  """t_i = eps + (1 - eps) * ((u + i/num) mod 1): one uniform draw, evenly spread over [eps, 1]."""
  return stratified_levels(rng, (), num, eps, dtype=dtype)


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
