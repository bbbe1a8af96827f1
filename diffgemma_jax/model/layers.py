"""Small building blocks: parameters with logical axes, RMSNorm, the scaled embedding and GeGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DTYPE_BY_NAME = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
  return DTYPE_BY_NAME[name]


def param(rngs: nnx.Rngs, shape, axes: tuple[str | None, ...], *, init: str = "normal", fan_in: int | None = None,
          dtype=jnp.float32) -> nnx.Param:
  """A Param tagged with logical axis names (`axes`), mapped to mesh axes by `parallel.rules`."""
  assert len(axes) == len(shape), (shape, axes)
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    std = (fan_in if fan_in else shape[0]) ** -0.5
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, dtype)
  return nnx.Param(value, axes=axes)


def rms_normalize(x, eps: float):
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis; `with_scale=False` is the parameter-free form (V-norm, router input)."""

  def __init__(self, dim: int, *, eps: float, with_scale: bool = True, axis_name: str = "norm",
               rngs: nnx.Rngs | None = None):
    self.eps = eps
    self.scale = param(rngs, (dim,), (axis_name,), init="ones") if with_scale else None

  def __call__(self, x):
    y = rms_normalize(x, self.eps)
    if self.scale is not None:
      y = y * self.scale[...]
    return y.astype(x.dtype)


class Embedder(nnx.Module):
  """Token embedding scaled by sqrt(D) on the way in; the same table is the (tied) unembedding."""

  def __init__(self, vocab_size: int, embed_dim: int, *, rngs: nnx.Rngs):
    self.embed_dim = embed_dim
    # std 1/sqrt(D): after the sqrt(D) input scale tokens enter at unit RMS.
    self.embedding = param(rngs, (vocab_size, embed_dim), ("vocab", "embed"), fan_in=embed_dim)

  def encode(self, tokens_BL, dtype):
    x_BLD = jnp.take(self.embedding[...], tokens_BL, axis=0).astype(dtype)
    return x_BLD * jnp.asarray(self.embed_dim ** 0.5, dtype)

  def decode(self, x_BLD):
    return jnp.einsum("BLD,VD->BLV", x_BLD, self.embedding[...].astype(x_BLD.dtype),
                      preferred_element_type=jnp.float32)


def geglu(x, w_gate_up_DF2, w_down_FD, dtype):
  """gelu_tanh(x Wg) * (x Wu) Wd with [D, 2F] gate|up weights."""
  gate_up = jnp.einsum("...D,DF->...F", x.astype(dtype), w_gate_up_DF2.astype(dtype))
  gate, up = jnp.split(gate_up, 2, axis=-1)
  hidden = jax.nn.gelu(gate, approximate=True) * up
  return jnp.einsum("...F,FD->...D", hidden, w_down_FD.astype(dtype))


class MLP(nnx.Module):
  """The dense, always-on GeGLU ("shared expert")."""

  def __init__(self, embed_dim: int, mlp_dim: int, *, rngs: nnx.Rngs):
    self.w_gate_up = param(rngs, (embed_dim, 2 * mlp_dim), ("embed", "mlp"))
    self.w_down = param(rngs, (mlp_dim, embed_dim), ("mlp", "embed"))

  def __call__(self, x, dtype):
    return geglu(x, self.w_gate_up[...], self.w_down[...], dtype)
