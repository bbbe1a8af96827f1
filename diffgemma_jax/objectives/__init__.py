"""Training objectives. Each exposes `loss_fn(model, batch, rng) -> (loss, metrics)` for the trainer and
`sequence_bound(model, batch, rng, num_t_samples=K) -> (nelbo_B, stderr_B, num_tokens_B)` for evaluation."""

from diffgemma_jax.objectives.ar import Autoregressive
from diffgemma_jax.objectives.masked import (MaskedDiffusion, corrupt, masked_nelbo, masked_token_nll,
                                             stratified_t, weighted_nll)

OBJECTIVES = {"masked": MaskedDiffusion, "ar": Autoregressive}


def make_objective(name: str, *, mask_id: int, eps: float = 1e-3):
  if name not in OBJECTIVES:
    raise ValueError(f"objective.name: unknown objective {name!r}; valid objectives are {tuple(OBJECTIVES)}")
  return OBJECTIVES[name](mask_id=mask_id, eps=eps)


__all__ = ["Autoregressive", "MaskedDiffusion", "OBJECTIVES", "corrupt", "make_objective", "masked_nelbo",
           "masked_token_nll", "stratified_t", "weighted_nll"]
