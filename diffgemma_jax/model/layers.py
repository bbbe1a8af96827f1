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

  def encode(self, tokens_BL, dtype, lookup=None):
    """Scaled embeddings of `tokens_BL`; `lookup(table_VD, tokens_BL, dtype)` reads the rows (a placement's: on a
    mesh, from the sharded table), by default a plain `take`."""
    if lookup is None:
      x_BLD = jnp.take(self.embedding[...], tokens_BL, axis=0).astype(dtype)
    else:
      x_BLD = lookup(self.embedding[...], tokens_BL, dtype)
    return x_BLD * jnp.asarray(self.embed_dim ** 0.5, dtype)

  def decode(self, x_BLD, logits=None):
    """Float32 logits of `x_BLD` against the table cast to `x_BLD`'s dtype; `logits(x_BLD, table_VD)` computes
    them (a placement's: on a mesh, gathering the table a tile at a time), by default one einsum."""
    if logits is not None:
      return logits(x_BLD, self.embedding[...])
    return jnp.einsum("BLD,VD->BLV", x_BLD, self.embedding[...].astype(x_BLD.dtype),
                      preferred_element_type=jnp.float32)


class LoRA(nnx.Module):
  """A low-rank adapter beside one projection W[*in, *out]: x -> (alpha / rank) (x A) B, A[*in, r], B[r, *out].

  B starts at zero, so the adapted projection equals the base one until trained. `delta()` is the dense update
  that merging adds to W (export, or serving without the adapter's extra matmuls).
  """

  def __init__(self, in_shape: tuple[int, ...], in_axes: tuple[str, ...], out_shape: tuple[int, ...],
               out_axes: tuple[str, ...], *, rank: int, alpha: float, rngs: nnx.Rngs):
    fan_in = 1
    for d in in_shape:
      fan_in *= d
    self.num_in = len(in_shape)
    self.scale = float(alpha) / rank
    self.a = param(rngs, tuple(in_shape) + (rank,), tuple(in_axes) + ("lora_rank",), fan_in=fan_in)
    self.b = param(rngs, (rank,) + tuple(out_shape), ("lora_rank",) + tuple(out_axes), init="zeros")

  def __call__(self, x, dtype):
    """The adapter's output for `x[..., *in]`: [..., *out]."""
    a = self.a[...].astype(dtype)
    b = self.b[...].astype(dtype)
    lead = x.shape[:x.ndim - self.num_in]
    h = jnp.einsum("...i,ir->...r", x.astype(dtype).reshape(lead + (-1,)), a.reshape(-1, a.shape[-1]))
    out = jnp.einsum("...r,ro->...o", h, b.reshape(b.shape[0], -1))
    return (out * jnp.asarray(self.scale, dtype)).reshape(lead + b.shape[1:])


def lora_delta(a, b, scale: float, base_ndim: int):
  """The dense update (alpha / rank) A B of adapter arrays A[*S, *in, r], B[*S, r, *out] for a base weight of
  `base_ndim` = |S| + |in| + |out| dimensions (S: leading stacked-layer dimensions of scanned layers)."""
  num_stack = a.ndim + b.ndim - base_ndim - 2
  stack = a.shape[:num_stack]
  in_shape, out_shape = a.shape[num_stack:-1], b.shape[num_stack + 1:]
  a2 = a.reshape(stack + (-1, a.shape[-1]))
  b2 = b.reshape(stack + (b.shape[num_stack], -1))
  delta = jnp.einsum("...ir,...ro->...io", a2.astype(jnp.float32), b2.astype(jnp.float32)) * scale
  return delta.reshape(stack + in_shape + out_shape)


def geglu(x, w_gate_up_DF2, w_down_FD, dtype, *, gate_up_lora: LoRA | None = None, down_lora: LoRA | None = None):
  """gelu_tanh(x Wg) * (x Wu) Wd with [D, 2F] gate|up weights (and LoRA adapters beside either matrix)."""
  x = x.astype(dtype)
  gate_up = jnp.einsum("...D,DF->...F", x, w_gate_up_DF2.astype(dtype))
  if gate_up_lora is not None:
    gate_up = gate_up + gate_up_lora(x, dtype)
  gate, up = jnp.split(gate_up, 2, axis=-1)
  hidden = jax.nn.gelu(gate, approximate=True) * up
  out = jnp.einsum("...F,FD->...D", hidden, w_down_FD.astype(dtype))
  if down_lora is not None:
    out = out + down_lora(hidden, dtype)
  return out


class MLP(nnx.Module):
  """The dense, always-on GeGLU ("shared expert"), with LoRA adapters when `lora_rank` > 0."""

  def __init__(self, embed_dim: int, mlp_dim: int, *, rngs: nnx.Rngs, lora_rank: int = 0, lora_alpha: float = 1.0):
    self.w_gate_up = param(rngs, (embed_dim, 2 * mlp_dim), ("embed", "mlp"))
    self.w_down = param(rngs, (mlp_dim, embed_dim), ("mlp", "embed"))
    self.w_gate_up_lora = LoRA((embed_dim,), ("embed",), (2 * mlp_dim,), ("mlp",), rank=lora_rank,
                               alpha=lora_alpha, rngs=rngs) if lora_rank else None
    self.w_down_lora = LoRA((mlp_dim,), ("mlp",), (embed_dim,), ("embed",), rank=lora_rank, alpha=lora_alpha,
                            rngs=rngs) if lora_rank else None

  def __call__(self, x, dtype):
    return geglu(x, self.w_gate_up[...], self.w_down[...], dtype, gate_up_lora=self.w_gate_up_lora,
                 down_lora=self.w_down_lora)
