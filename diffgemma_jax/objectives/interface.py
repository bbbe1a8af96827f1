"""What an objective is and what it supports: the `Objective` interface and its declared `Capabilities`.

An objective turns a batch into a training loss (`loss_fn`) and a per-row likelihood bound for evaluation
(`sequence_bound`). What it supports is declared once, on its class (`capabilities`); config validation, data
preparation, evaluation and the samplers ask that declaration rather than naming objectives. An objective is a frozen
dataclass: its fields are the keys of the run config's `objective` section it reads (`make_objective`), and
`mask_id`, the tokenizer's mask token, when it corrupts to it.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class Capabilities:
  """What an objective supports."""
  exact: bool  # `sequence_bound` is the exact negative log-likelihood (standard error 0), not a bound
  sft_rows: bool  # trains on SFT rows: reads `loss_mask`, the prompt never corrupted or scored
  canvases: bool  # cuts rows into canvases of objective.block_size, one pass over [canvas ; clean]
  self_conditioning: bool  # feeds a self-conditioning signal (model.self_conditioning)
  token_shift: bool  # trains, and its samplers decode, with model.token_shift (an adapted AR checkpoint)
  mask_token: bool  # corrupts tokens to <mask>: the tokenizer needs one
  # predicts each token from the tokens before it (a causal pass), so one pass gives every position's greedy next
  # token: whether a continuation is the greedy one is answerable (Scorer.greedy, the harness's is_greedy)
  next_token: bool


class Objective(abc.ABC):
  """A training objective: a loss for the trainer, a per-row bound for evaluation, and its capabilities."""

  name: ClassVar[str]
  capabilities: ClassVar[Capabilities]

  @abc.abstractmethod
  def loss_fn(self, model, batch, rng):
    """(loss, metrics) of a batch; metrics include `num_tokens` and the router's (`rows.router_metrics`)."""

  @abc.abstractmethod
  def sequence_bound(self, model, batch, rng, *, num_t_samples: int):
    """(nelbo_B, stderr_B, num_tokens_B): per row, the negative log-likelihood bound in nats of its scored
    tokens, its Monte-Carlo standard error over `num_t_samples` noise levels, and the number of scored tokens."""

  def model_passes(self, seq_len: int, model_cfg) -> float:
    """A training row's model FLOPs in units of one forward-and-backward pass over the row's `seq_len` tokens
    (the trainer's MFU): 1 for objectives that run the model once over the row."""
    del seq_len, model_cfg
    return 1.0
