"""The trainer: sharded state, the pure train step, AdamW, Orbax checkpoints, metrics, and the loop."""

from diffgemma_jax.train.checkpoint import Checkpointer
from diffgemma_jax.train.compiled import CompiledStep, compile_train_step, synthetic_batch
from diffgemma_jax.train.loop import train
from diffgemma_jax.train.optimizer import learning_rate_schedule, make_optimizer
from diffgemma_jax.train.state import TrainState, abstract_train_state, init_train_state
from diffgemma_jax.train.step import make_train_step, train_step

__all__ = ["Checkpointer", "CompiledStep", "TrainState", "abstract_train_state", "compile_train_step",
           "init_train_state", "learning_rate_schedule", "make_optimizer", "make_train_step", "synthetic_batch",
           "train", "train_step"]
