"""Training objectives behind one interface (`interface.Objective`): `loss_fn(model, batch, rng) -> (loss, metrics)`
for the trainer, `sequence_bound(model, batch, rng, num_t_samples=K) -> (nelbo_B, stderr_B, num_tokens_B)` for
evaluation, and the `Capabilities` each declares. `make_objective` is the one constructor from a run config."""

from __future__ import annotations

import dataclasses

from diffgemma_jax.errors import ConfigError
from diffgemma_jax.objectives.ar import Autoregressive
from diffgemma_jax.objectives.block import BlockDiffusion, block_ids, block_nelbo, canvas_clean_mask, canvas_layout
from diffgemma_jax.objectives.estimators import masked_token_nll, mean_and_stderr, stratified_levels, stratified_t
from diffgemma_jax.objectives.interface import Capabilities, Objective
from diffgemma_jax.objectives.masked import MaskedDiffusion, corrupt, masked_nelbo, weighted_nll
from diffgemma_jax.objectives.uniform import (UniformDiffusion, uniform_corrupt, uniform_elbo_integrand,
                                              uniform_nelbo)

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (MaskedDiffusion, Autoregressive, BlockDiffusion,
                                                                    UniformDiffusion)}


def objectives_with(capability: str) -> tuple[str, ...]:
  """The names of the objectives that declare `capability` (a field of `Capabilities`), e.g. "sft_rows"."""
  if capability not in {field.name for field in dataclasses.fields(Capabilities)}:
    raise ValueError(f"capability {capability!r} unknown; valid are "
                     f"{tuple(field.name for field in dataclasses.fields(Capabilities))}")
  return tuple(name for name, cls in OBJECTIVES.items() if getattr(cls.capabilities, capability))


def make_objective(section, *, mask_id: int) -> Objective:
  """The objective of a run config's `objective` section (a ConfigDict or mapping): `name` picks it, and each of
  its fields (`eps`, `block_size`, ...) takes the section's value when the section has the key, else the
  objective's default. `mask_id` is the tokenizer's mask token, for the objectives that have the field. A bare
  name stands for a section holding only it."""
  values = {"name": section} if isinstance(section, str) else (
      section.to_dict() if hasattr(section, "to_dict") else dict(section))
  name = values.get("name")
  if name not in OBJECTIVES:
    raise ConfigError(f"objective.name: unknown objective {name!r}; valid objectives are {tuple(OBJECTIVES)}")
  cls = OBJECTIVES[name]
  options = {}
  for field in dataclasses.fields(cls):
    if field.name == "mask_id":
      options["mask_id"] = int(mask_id)
    elif field.name in values:
      options[field.name] = type(field.default)(values[field.name])
  return cls(**options)


__all__ = ["Autoregressive", "BlockDiffusion", "Capabilities", "MaskedDiffusion", "OBJECTIVES", "Objective",
           "UniformDiffusion", "block_ids", "block_nelbo", "canvas_clean_mask", "canvas_layout", "corrupt",
           "make_objective", "masked_nelbo", "masked_token_nll", "mean_and_stderr", "objectives_with",
           "stratified_levels", "stratified_t", "uniform_corrupt", "uniform_elbo_integrand", "uniform_nelbo",
           "weighted_nll"]
