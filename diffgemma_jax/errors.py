"""Every error the package raises on purpose, in one module that imports nothing of the package.

Each message names the config key, flag, file or field that is wrong and what would be valid; the entry points
print it as one line and exit non-zero (`launch/common.py`). Any layer may raise any of these without importing
another layer.
"""

from __future__ import annotations


class ConfigError(ValueError):
  """A config value, flag or workdir is invalid; the message names the key and what would be valid."""


class DataError(ValueError):
  """A corpus, dataset directory, record or data option is unusable."""


class IncompatibleCheckpointError(ConfigError):
  """The workdir holds checkpoints of a model (or optimizer) whose parameters differ from the config's."""


class DamagedCheckpointError(ConfigError):
  """A step folder no longer holds what was written (a copy cut short, a full disk, a deleted file)."""

  def __init__(self, message: str, step: int, problem: str):
    super().__init__(message)
    self.step, self.problem = step, problem


class CoordinatorUnreachableError(ConfigError):
  """A process could not join the run: the coordinator did not answer in time."""


class GenerationError(ConfigError):
  """A generation request or option is invalid; the message names the flag and what would be valid."""


class ScoringError(DataError):
  """A record or request that cannot be scored; the message names it and what would be valid."""


class MappingError(ValueError):
  """Hugging Face tensors that do not map one-to-one onto ours: the message lists every offending name."""


class NonFiniteLossError(RuntimeError):
  """An update produced a NaN or Inf loss or gradient; the run stopped before saving anything after it."""


class EngineStalledError(RuntimeError):
  """The continuous-batching engine left a request unfinished after more steps than its lone run can take: a bug
  in the engine, not bad input; the message names the request and its slot's state."""


__all__ = ["ConfigError", "CoordinatorUnreachableError", "DamagedCheckpointError", "DataError", "EngineStalledError",
           "GenerationError", "IncompatibleCheckpointError", "MappingError", "NonFiniteLossError", "ScoringError"]
