"""Quality of samples: generative perplexity under an autoregressive model (MDLM / SEDD's gen-PPL) and the unigram
entropy of each sample (low entropy flags repetition)."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffgemma_jax.model.masks import make_mask
from diffgemma_jax.objectives.ar import next_token_nll


def continuation_nll(model, tokens_BL, segment_ids_BL, first_scored: int):
  """Per-row summed -log p(x_l | x_<l) over l >= `first_scored` inside the row's segment, and the count."""
  positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1], dtype=jnp.int32), tokens_BL.shape)
  logits, _ = model(tokens_BL, positions_BL, make_mask("causal", segment_ids_BL, positions_BL),
                    token_mask_BL=segment_ids_BL > 0)
  nll_BL, valid_BL = next_token_nll(logits, tokens_BL, segment_ids_BL)  # index l scores token l + 1
  valid_BL = valid_BL & (jnp.arange(1, tokens_BL.shape[1])[None, :] >= first_scored)
  return jnp.sum(jnp.where(valid_BL, nll_BL, 0.0), axis=-1), jnp.sum(valid_BL, axis=-1)


def scored_segments(sequences: Sequence[Sequence[int]], prompt_length: int, eos_id: int) -> np.ndarray:
  """Segment id 1 from the start through the first generated EOS (included: ending is part of the sample), 0 after."""
  segments = np.zeros((len(sequences), len(sequences[0])), np.int32)
  for row, tokens in enumerate(sequences):
    end = len(tokens)
    for index in range(prompt_length, len(tokens)):
      if int(tokens[index]) == eos_id:
        end = index + 1
        break
    segments[row, :end] = 1
  return segments


class GenerativePerplexity:
  """Scores continuations (given their prompts) under an autoregressive model; jitted once per shape."""

  def __init__(self, ar_model):
    graphdef, state = nnx.split(ar_model)
    self._state = state
    self._fn = jax.jit(lambda s, t, seg, first: continuation_nll(nnx.merge(graphdef, s), t, seg, first),
                       static_argnums=3)

  def __call__(self, sequences, prompt_length: int, *, eos_id: int) -> dict:
    """`sequences` [N, P + G] (prompt + generated ids); returns gen_ppl over all samples and per-sample values."""
    tokens = np.asarray(sequences, np.int32)
    segments = scored_segments(tokens, prompt_length, eos_id)
    nll, count = jax.device_get(self._fn(self._state, tokens, segments, prompt_length))
    total_nll, total = float(np.sum(nll)), int(np.sum(count))
    return {"gen_ppl": math.exp(total_nll / total) if total else float("nan"),
            "per_sample_gen_ppl": [math.exp(float(n) / int(c)) if c else float("nan") for n, c in zip(nll, count)],
            "num_tokens": total}


def unigram_entropy(tokens: Sequence[int]) -> float:
  """Entropy (nats) of the empirical token distribution of one sample; 0 for a single repeated token."""
  tokens = np.asarray(tokens, np.int64)
  if tokens.size == 0:
    return 0.0
  _, counts = np.unique(tokens, return_counts=True)
  p = counts / counts.sum()
  return float(-np.sum(p * np.log(p)))
