"""The typed, frozen model config: the one boundary between ml_collections and the model.

`ModelConfig` is the only schema of the model section: `configs/` build their `model` ConfigDict from its defaults
(`model_config_dict()`), and `ModelConfig.from_config_dict` turns it back into a validated dataclass. Every
validation error names the config key (`model.<field>`) and what would be valid.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from diffgemma_jax.errors import ConfigError

LAYER_KINDS = ("sliding", "global")
DISPATCH_BACKENDS = ("dense", "ragged", "sorted", "pallas", "pallas_mosaic", "auto")
# model/attention_impl.py: xla (dense logits, the reference), pallas (our flash-attention kernel), cudnn (cuDNN via
# jax.nn.dot_product_attention where the mask fits), pallas_mosaic (the same kernel on Pallas Mosaic GPU: Hopper,
# bfloat16 / float16), auto (pallas on a GPU, xla elsewhere).
ATTENTION_IMPLS = ("xla", "chunked", "pallas", "cudnn", "pallas_mosaic", "auto")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
EXPERT_COLLECTIVES = ("all_to_all", "ragged_all_to_all")
# Projections a LoRA adapter may wrap; "attention" stands for all four attention projections.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "mlp")
LORA_TARGET_ALIASES = {"attention": ("q_proj", "k_proj", "v_proj", "o_proj")}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Gemma-4-style sparse-MoE denoiser. Defaults are a tiny model that trains on two CPU cores."""

  vocab_size: int = 512
  embed_dim: int = 128
  num_layers: int = 4
  # Repeated to `num_layers`; `num_layers` must be a multiple of its length.
  layer_pattern: tuple[str, ...] = ("sliding", "global")
  num_heads: int = 4
  # Sliding-window layers.
  head_dim: int = 32
  num_kv_heads: int = 2
  sliding_window: int = 64
  rope_base: float = 10_000.0
  rope_fraction: float = 1.0
  # Global layers: their own head_dim, KV-head count, K=V sharing and RoPE.
  global_head_dim: int = 64
  global_num_kv_heads: int = 1
  global_k_eq_v: bool = True
  global_rope_base: float = 1_000_000.0
  global_rope_fraction: float = 0.25
  # Which attention computes the layers (ATTENTION_IMPLS); dense masks always take the xla path.
  attention_impl: str = "auto"
  # Feed-forward: the always-on dense GeGLU ("shared expert") plus routed GeGLU experts.
  mlp_dim: int = 256
  num_experts: int = 8
  top_k: int = 2
  expert_dim: int = 128
  dispatch: str = "auto"
  # Expert parallelism (a mesh whose `expert` axis is > 1): a token travels once to each expert shard it routes to.
  # capacity_factor times what an even routing needs sizes the buffers: the rows each shard may send to each expert
  # shard and the (token, expert) assignments each shard may run (`parallel.expert.expert_capacity`); the excess
  # is dropped and counted. `dropless` sizes them for the worst case instead. `ragged_all_to_all` sends exactly
  # the routed rows (GPU/TPU only).
  capacity_factor: float = 2.0
  dropless: bool = False
  expert_collective: str = "all_to_all"
  # Auxiliary router losses, off by default; always computed for logging.
  load_balance_loss_weight: float = 0.0
  router_z_loss_weight: float = 0.0
  # Output.
  logit_softcap: float = 30.0
  norm_eps: float = 1e-6
  # Numerics and memory.
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  # Self-conditioning (uniform-state objective only): a GeGLU of width `self_conditioning_dim` (0: model.mlp_dim)
  # maps the previous prediction's expected embedding into the canvas embeddings. Off: no parameters at all.
  self_conditioning: bool = False
  self_conditioning_dim: int = 0
  # The released DiffusionGemma RMS-normalises (no scale) the input embeddings of canvas positions (token embedding
  # plus self-conditioning term) before the first layer; the encoder (clean) positions are not. Callers mark the
  # canvas with `canvas_BL`. Off keeps "self-conditioning on but untrained computes what off computes".
  canvas_input_norm: bool = False
  # Token shift (masked and block objectives): the logits that predict position l are the output at l-1, the
  # next-token reading an autoregressive checkpoint already has (Dream's and Fast-dLLM v2's recipe for adapting
  # an AR model to diffusion). A block model's canvas starts are predicted by the clean (causal) pass at the slot
  # before them; the first token of a document has no predecessor and is never noised or scored.
  token_shift: bool = False
  # LoRA (fine-tuning): rank > 0 adds low-rank adapters W + (alpha / rank) A B beside the `lora_targets`
  # projections ("attention", "q_proj", "k_proj", "v_proj", "o_proj", "mlp" = the dense GeGLU); B starts at zero,
  # so an adapted model computes what its base computes until trained. 0: no adapter parameters at all.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ("attention", "mlp")
  # The longest context, in positions, the weights are known to serve beyond the rows this run trains on: an
  # imported checkpoint's `max_position_embeddings`, or what a fine-tune's init.checkpoint served. Defines no
  # parameter; the Hugging Face export writes the larger of it and the trained train.seq_len
  # (`train.reading.trained_context`). 0: none recorded (a run trained from scratch).
  max_positions: int = 0

  def __post_init__(self):
    object.__setattr__(self, "layer_pattern", tuple(self.layer_pattern))
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    self.validate()

  # ---- derived -------------------------------------------------------------------------------------------------
  @property
  def layer_kinds(self) -> tuple[str, ...]:
    reps = self.num_layers // len(self.layer_pattern)
    return tuple(self.layer_pattern) * reps

  def attention_dims(self, kind: str) -> tuple[int, int, bool]:
    """(head_dim, num_kv_heads, k_eq_v) of a layer kind."""
    if kind == "global":
      return self.global_head_dim, self.global_num_kv_heads, self.global_k_eq_v
    return self.head_dim, self.num_kv_heads, False

  def lora(self, target: str) -> bool:
    """Whether projection `target` (one of LORA_TARGETS) carries a LoRA adapter."""
    if self.lora_rank <= 0:
      return False
    names = set()
    for t in self.lora_targets:
      names.update(LORA_TARGET_ALIASES.get(t, (t,)))
    return target in names

  def rope(self, kind: str) -> tuple[float, float]:
    """(base, rotary fraction) of a layer kind."""
    if kind == "global":
      return self.global_rope_base, self.global_rope_fraction
    return self.rope_base, self.rope_fraction

  # ---- validation ----------------------------------------------------------------------------------------------
  def validate(self) -> None:
    def fail(key, msg):  # "model.top_k=9 exceeds ..." or "model.top_k: must be ..."
      raise ConfigError(f"model.{key}{'' if msg.startswith('=') else ': '}{msg}")

    for key in ("vocab_size", "embed_dim", "num_layers", "num_heads", "head_dim", "num_kv_heads", "global_head_dim",
                "global_num_kv_heads", "mlp_dim", "num_experts", "top_k", "expert_dim", "sliding_window"):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        fail(key, f"must be a positive integer, got {value!r}")
    if not self.layer_pattern:
      fail("layer_pattern", "must name at least one layer kind")
    for kind in self.layer_pattern:
      if kind not in LAYER_KINDS:
        fail("layer_pattern", f"unknown layer kind {kind!r}; valid kinds are {LAYER_KINDS}")
    if self.num_layers % len(self.layer_pattern):
      fail("layer_pattern", f"has length {len(self.layer_pattern)}, which does not divide model.num_layers="
           f"{self.num_layers}; use a pattern whose length divides the layer count")
    if self.num_heads % self.num_kv_heads:
      fail("num_kv_heads", f"={self.num_kv_heads} does not divide model.num_heads={self.num_heads}")
    if self.num_heads % self.global_num_kv_heads:
      fail("global_num_kv_heads", f"={self.global_num_kv_heads} does not divide model.num_heads={self.num_heads}")
    if self.top_k > self.num_experts:
      fail("top_k", f"={self.top_k} exceeds model.num_experts={self.num_experts}; choose 1 <= top_k <= num_experts")
    if self.attention_impl not in ATTENTION_IMPLS:
      fail("attention_impl", f"unknown attention implementation {self.attention_impl!r}; valid are {ATTENTION_IMPLS}")
    if self.attention_impl == "pallas_mosaic" and self.compute_dtype not in ("bfloat16", "float16"):
      fail("attention_impl", f"='pallas_mosaic' needs model.compute_dtype bfloat16 or float16 (wgmma operands), got "
           f"{self.compute_dtype!r}; use attention_impl='pallas' for float32")
    if self.dispatch not in DISPATCH_BACKENDS:
      fail("dispatch", f"unknown dispatch backend {self.dispatch!r}; valid backends are {DISPATCH_BACKENDS}")
    if self.dispatch == "pallas_mosaic" and self.compute_dtype not in ("bfloat16", "float16"):
      fail("dispatch", f"='pallas_mosaic' needs model.compute_dtype bfloat16 or float16 (wgmma's 16-bit operands), got "
           f"{self.compute_dtype!r}; use 'pallas' for float32")
    if not isinstance(self.capacity_factor, (int, float)) or isinstance(self.capacity_factor, bool) or \
        self.capacity_factor <= 0:
      fail("capacity_factor", f"must be a number > 0 (1.0: room for a perfectly even split), got "
           f"{self.capacity_factor!r}; for no drops at all set model.dropless=True")
    if not isinstance(self.dropless, bool):
      fail("dropless", f"must be True or False, got {self.dropless!r}")
    if self.expert_collective not in EXPERT_COLLECTIVES:
      fail("expert_collective", f"unknown collective {self.expert_collective!r}; valid are {EXPERT_COLLECTIVES}")
    if self.remat not in REMAT_POLICIES:
      fail("remat", f"unknown remat policy {self.remat!r}; valid policies are {REMAT_POLICIES}")
    for key in ("param_dtype", "compute_dtype"):
      if getattr(self, key) not in DTYPES:
        fail(key, f"unknown dtype {getattr(self, key)!r}; valid dtypes are {DTYPES}")
    for key in ("rope_fraction", "global_rope_fraction"):
      frac = getattr(self, key)
      if not 0.0 <= frac <= 1.0:
        fail(key, f"must lie in [0, 1], got {frac}")
    for key, kind in (("rope_fraction", "sliding"), ("global_rope_fraction", "global")):
      head_dim = self.attention_dims(kind)[0]
      if int(round(head_dim * getattr(self, key))) % 2:
        fail(key, f"rotates {head_dim}*{getattr(self, key)} dims of a {kind} head, which must be an even number")
    if self.logit_softcap < 0:
      fail("logit_softcap", f"must be >= 0 (0 disables it), got {self.logit_softcap}")
    if not isinstance(self.self_conditioning_dim, int) or isinstance(self.self_conditioning_dim, bool) or \
        self.self_conditioning_dim < 0:
      fail("self_conditioning_dim", f"must be a non-negative integer (0: model.mlp_dim), got {self.self_conditioning_dim!r}")
    if not isinstance(self.self_conditioning, bool):
      fail("self_conditioning", f"must be True or False, got {self.self_conditioning!r}")
    if not isinstance(self.canvas_input_norm, bool):
      fail("canvas_input_norm", f"must be True or False, got {self.canvas_input_norm!r}")
    if not isinstance(self.token_shift, bool):
      fail("token_shift", f"must be True or False, got {self.token_shift!r}")
    if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
      fail("lora_rank", f"must be a non-negative integer (0: no LoRA adapters), got {self.lora_rank!r}")
    if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0:
      fail("lora_alpha", f"must be a number > 0, got {self.lora_alpha!r}")
    valid_targets = tuple(LORA_TARGET_ALIASES) + LORA_TARGETS
    for target in self.lora_targets:
      if target not in valid_targets:
        fail("lora_targets", f"unknown target {target!r}; valid targets are {valid_targets} (experts are never "
             f"adapted: freeze them with train.freeze)")
    if self.lora_rank and not self.lora_targets:
      fail("lora_targets", "is empty while model.lora_rank > 0; name at least one projection or set lora_rank=0")
    if not isinstance(self.max_positions, int) or isinstance(self.max_positions, bool) or self.max_positions < 0:
      fail("max_positions", f"must be a non-negative integer (0: none recorded, the export writes train.seq_len), "
           f"got {self.max_positions!r}")
    if self.scan_layers and self.num_layers // len(self.layer_pattern) < 1:
      fail("scan_layers", "needs at least one full repetition of model.layer_pattern")

  # ---- the ml_collections boundary -----------------------------------------------------------------------------
  @classmethod
  def from_config_dict(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
    """Builds and validates a ModelConfig from `config.model`; unknown keys fail with the list of valid ones."""
    values = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ConfigError(f"unknown key(s) model.{', model.'.join(unknown)}; valid keys are: {', '.join(names)}")
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def model_config_dict(**overrides) -> dict[str, Any]:
  """The model section of a run config: ModelConfig's defaults with overrides, validated."""
  return ModelConfig(**overrides).to_dict()
