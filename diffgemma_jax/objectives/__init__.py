"""Training objectives. Each exposes `loss_fn(model, batch, rng) -> (loss, metrics)` for the trainer and
`sequence_bound(model, batch, rng, num_t_samples=K) -> (nelbo_B, stderr_B, num_tokens_B)` for evaluation."""

from diffgemma_jax.objectives.ar import Autoregressive
from diffgemma_jax.objectives.block import BlockDiffusion, block_ids, block_nelbo, canvas_clean_mask
from diffgemma_jax.objectives.masked import (MaskedDiffusion, corrupt, masked_nelbo, masked_token_nll,
                                             stratified_t, weighted_nll)
from diffgemma_jax.objectives.uniform import (UniformDiffusion, uniform_corrupt, uniform_elbo_integrand,
                                              uniform_nelbo)

OBJECTIVES = {"masked": MaskedDiffusion, "ar": Autoregressive, "block": BlockDiffusion, "uniform": UniformDiffusion}
# Objectives that feed a self-conditioning signal; model.self_conditioning is an error with any other.
SELF_CONDITIONING_OBJECTIVES = ("uniform",)


def make_objective(name: str, *, mask_id: int, eps: float = 1e-3, section=None):
  """The objective `name`; `section` (the run config's `objective` section) supplies the block and uniform keys."""
  if name not in OBJECTIVES:
    raise ValueError(f"objective.name: unknown objective {name!r}; valid objectives are {tuple(OBJECTIVES)}")
  options = {}
  if section is not None and name in ("block", "uniform"):
    options["block_size"] = int(section.block_size)
  if section is not None and name == "uniform":
    options["encoder_loss_weight"] = float(section.encoder_loss_weight)
    options["self_cond_prob"] = float(section.self_cond_prob)
  return OBJECTIVES[name](mask_id=mask_id, eps=eps, **options)


__all__ = ["Autoregressive", "BlockDiffusion", "MaskedDiffusion", "OBJECTIVES", "SELF_CONDITIONING_OBJECTIVES",
           "UniformDiffusion", "block_ids", "block_nelbo", "canvas_clean_mask", "corrupt", "make_objective",
           "masked_nelbo", "masked_token_nll", "stratified_t", "uniform_corrupt", "uniform_elbo_integrand",
           "uniform_nelbo", "weighted_nll"]
