"""The objective interface (`objectives/__init__.py`, `objectives/interface.py`): one constructor from the config's
objective section, the declared capabilities, and the config checks that read them."""

import dataclasses

import pytest

from diffgemma_jax.config import base_config, validate
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.objectives import (OBJECTIVES, Autoregressive, BlockDiffusion, Capabilities, MaskedDiffusion,
                                      Objective, UniformDiffusion, make_objective, objectives_with)

MASK = 63


def test_make_objective_from_a_run_config():
  c = base_config()
  c.objective.name, c.objective.eps, c.objective.block_size = "uniform", 0.01, 8
  objective = make_objective(c.objective, mask_id=5)
  assert objective == UniformDiffusion(mask_id=5, eps=0.01, block_size=8, encoder_loss_weight=1.0,
                                       self_cond_prob=0.5)
  assert isinstance(objective.block_size, int) and objective.excluded_ids == (5,)
  assert make_objective("ar", mask_id=5) == Autoregressive()  # a bare name: the objective's defaults
  assert make_objective("masked", mask_id=5) == MaskedDiffusion(mask_id=5, eps=1e-3)
  with pytest.raises(ConfigError, match="objective.name: unknown objective 'beam'; valid objectives are"):
    make_objective("beam", mask_id=5)


def test_every_objective_declares_its_capabilities():
  for name, cls in OBJECTIVES.items():
    assert issubclass(cls, Objective) and cls.name == name and isinstance(cls.capabilities, Capabilities)
    assert dataclasses.is_dataclass(cls)
  assert objectives_with("exact") == ("ar",)
  assert objectives_with("sft_rows") == tuple(OBJECTIVES)
  assert objectives_with("canvases") == ("block", "uniform")
  assert objectives_with("mask_token") == ("masked", "block")
  assert objectives_with("next_token") == ("ar",)
  with pytest.raises(ValueError, match="capability 'fast' unknown"):
    objectives_with("fast")
  with pytest.raises(TypeError):
    Autoregressive(mask_id=4)  # no silently ignored arguments


@pytest.mark.parametrize("key,refusing,accepting", [("self_conditioning", ("masked", "ar", "block"), ("uniform",)),
                                                     ("token_shift", ("ar", "uniform"), ("masked", "block"))])
def test_model_settings_that_need_some_objectives(key, refusing, accepting):
  for name in refusing + accepting:
    c = base_config()
    c.objective.name = name
    c.model[key] = True
    if name in accepting:
      validate(c)
    else:
      with pytest.raises(ConfigError, match=rf"model.{key}=True.*objective.name"):
        validate(c)


def test_make_objective_reads_the_objective_section():
  section = dict(block_size=8, encoder_loss_weight=0.5, self_cond_prob=0.25, eps=1e-3)
  block = make_objective(dict(section, name="block"), mask_id=MASK)
  assert isinstance(block, BlockDiffusion) and block.block_size == 8
  uniform = make_objective(dict(section, name="uniform"), mask_id=MASK)
  assert (uniform.block_size, uniform.encoder_loss_weight, uniform.self_cond_prob) == (8, 0.5, 0.25)
  assert isinstance(make_objective(dict(section, name="masked"), mask_id=MASK), MaskedDiffusion)
