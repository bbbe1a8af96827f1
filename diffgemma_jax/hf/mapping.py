"""One-to-one mapping between Hugging Face DiffusionGemma tensors and our parameters, both ways.

The reference (`transformers` `DiffusionGemmaForBlockDiffusion`) holds two copies of the text stack, the causal
encoder (`model.encoder.language_model.*`) and the canvas decoder (`model.decoder.*`), tied weight for weight; its
`save_pretrained` writes the decoder's copy plus both copies of the `layer_scalar` buffers (buffers are not tied).
We hold one stack. Every one of our parameters is one decoder tensor (`hf_name`), laid out differently:

  ours                                   Hugging Face (torch Linear weights are [out, in])
  embedder.embedding [V, D]              decoder.embed_tokens.weight [V, D] (= lm_head.weight, tied)
  attn.q_proj [D, N, H]                  self_attn.q_proj.weight [N*H, D]
  attn.k_proj / v_proj [D, K, H]         self_attn.k_proj / v_proj.weight [K*H, D] (no v_proj on global layers)
  attn.o_proj [N, H, D]                  self_attn.o_proj.weight [D, N*H]
  mlp.w_gate_up [D, 2F] (gate|up)        mlp.gate_proj.weight [F, D], mlp.up_proj.weight [F, D]
  mlp.w_down [F, D]                      mlp.down_proj.weight [D, F]
  moe.router_w [D, E]                    router.proj.weight [E, D]
  moe.w_gate_up [E, D, 2F] (gate|up)     experts.gate_up_proj [E, 2F, D]
  moe.w_down [E, F, D]                   experts.down_proj [E, D, F]
  norms, scales, layer_scalar            the same vectors

The pairs of ours that are two HF tensors (the dense and self-conditioning gate|up) are split/joined here.
Names are plain strings; arrays are numpy, so nothing in this module needs torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from diffgemma_jax.errors import MappingError
from diffgemma_jax.model.config import ModelConfig

DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
LM_HEAD = "lm_head.weight"
# Multimodal parts of the released checkpoint that a text-only denoiser does not have.
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
LAYER_KIND_TO_HF = {"sliding": "sliding_attention", "global": "full_attention"}
HF_TO_LAYER_KIND = {v: k for k, v in LAYER_KIND_TO_HF.items()}
# Our block's norms and the reference decoder layer's.
BLOCK_NORMS = {
    "pre_attn_norm": "input_layernorm",
    "post_attn_norm": "post_attention_layernorm",
    "pre_mlp_norm": "pre_feedforward_layernorm",
    "post_mlp_norm": "post_feedforward_layernorm_1",
    "pre_moe_norm": "pre_feedforward_layernorm_2",
    "post_moe_norm": "post_feedforward_layernorm_2",
    "post_ffn_norm": "post_feedforward_layernorm",
}


# config.json's model_type (the whole model's, or its text config's), and the text config keys with no default.
MODEL_TYPES = ("diffusion_gemma", "diffusion_gemma_text")
REQUIRED_TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "head_dim", "sliding_window", "intermediate_size", "num_experts", "top_k_experts",
                      "moe_intermediate_size")


# ---- configs -----------------------------------------------------------------------------------------------------
def _period(kinds: list[str]) -> tuple[str, ...]:
  """The shortest pattern that repeats exactly to `kinds`."""
  for n in range(1, len(kinds) + 1):
    if len(kinds) % n == 0 and kinds == kinds[:n] * (len(kinds) // n):
      return tuple(kinds[:n])
  return tuple(kinds)


def text_config_of(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """The text part of a `DiffusionGemmaConfig` dict (or the text config itself)."""
  return dict(hf_config.get("text_config", hf_config))


def model_overrides_from_hf(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """Our `model` section (overrides of ModelConfig's defaults) for a Hugging Face config.json dict.

  Fails on a model_type other than DiffusionGemma's, listing missing required keys, and with every unsupported
  setting listed (attention bias, an activation other than tanh-GELU, RoPE types we do not implement, per-layer
  head dims that differ within a layer kind).
  """
  model_type = hf_config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise MappingError(f"config.json has model_type={model_type!r}, not a DiffusionGemma model (valid: "
                       f"{MODEL_TYPES}); only DiffusionGemma checkpoints can be imported")
  text = text_config_of(hf_config)
  missing = [key for key in REQUIRED_TEXT_KEYS if key not in text]
  if missing:
    where = "text_config" if "text_config" in hf_config else "config.json"
    raise MappingError(f"unsupported Hugging Face config: {where} lacks {', '.join(missing)}")
  problems = []
  if text.get("attention_bias"):
    problems.append("text_config.attention_bias=true (our attention has no biases)")
  if text.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
    problems.append(f"text_config.hidden_activation={text.get('hidden_activation')!r} (ours is tanh-GELU)")
  if text.get("use_bidirectional_attention") == "all":
    problems.append("text_config.use_bidirectional_attention='all' (the encoder pass is causal here)")
  num_layers = int(text["num_hidden_layers"])
  layer_types = list(text.get("layer_types") or [])
  if len(layer_types) != num_layers:
    problems.append(f"text_config.layer_types has {len(layer_types)} entries for {num_layers} layers")
  unknown_types = sorted(set(layer_types) - set(HF_TO_LAYER_KIND))
  if unknown_types:
    problems.append(f"text_config.layer_types {unknown_types} (known: {sorted(HF_TO_LAYER_KIND)})")
  rope = text.get("rope_parameters") or {}
  per_layer = {int(k): v for k, v in (text.get("per_layer_config") or {}).items()}
  head_dim, num_kv = int(text["head_dim"]), int(text["num_key_value_heads"])
  dims = {}
  for i, t in enumerate(layer_types):
    over = per_layer.get(i, {})
    dims.setdefault(t, set()).add((int(over.get("head_dim", head_dim)), int(over.get("num_key_value_heads", num_kv))))
  for t, d in dims.items():
    if len(d) > 1:
      problems.append(f"layers of type {t} have different (head_dim, num_key_value_heads): {sorted(d)}")
  rope_values = {}
  for t in ("sliding_attention", "full_attention"):
    p = rope.get(t) or {}
    kind = p.get("rope_type", "default")
    fraction = float(p.get("partial_rotary_factor", 1.0))
    if kind not in ("default", "proportional") or float(p.get("factor", 1.0)) != 1.0:
      problems.append(f"text_config.rope_parameters.{t}: rope_type={kind!r} factor={p.get('factor', 1.0)} "
                      "(supported: 'default' and 'proportional' without scaling)")
    if kind == "default" and fraction != 1.0:
      problems.append(f"text_config.rope_parameters.{t}: 'default' RoPE with partial_rotary_factor={fraction}")
    rope_values[t] = (float(p.get("rope_theta", 10_000.0 if t == "sliding_attention" else 1_000_000.0)), fraction)
  if problems:
    raise MappingError("unsupported Hugging Face config: " + "; ".join(problems))

  sliding = next(iter(dims.get("sliding_attention", {(head_dim, num_kv)})))
  global_ = next(iter(dims.get("full_attention", {(head_dim, num_kv)})))
  overrides = dict(
      vocab_size=int(text["vocab_size"]),
      embed_dim=int(text["hidden_size"]),
      num_layers=num_layers,
      layer_pattern=tuple(HF_TO_LAYER_KIND[t] for t in _period(layer_types)),
      num_heads=int(text["num_attention_heads"]),
      head_dim=sliding[0],
      num_kv_heads=sliding[1],
      sliding_window=int(text["sliding_window"]),
      rope_base=rope_values["sliding_attention"][0],
      rope_fraction=rope_values["sliding_attention"][1],
      global_head_dim=global_[0],
      global_num_kv_heads=global_[1],
      global_k_eq_v=True,
      global_rope_base=rope_values["full_attention"][0],
      global_rope_fraction=rope_values["full_attention"][1],
      mlp_dim=int(text["intermediate_size"]),
      num_experts=int(text["num_experts"]),
      top_k=int(text["top_k_experts"]),
      expert_dim=int(text["moe_intermediate_size"]),
      logit_softcap=float(text.get("final_logit_softcapping") or 30.0),
      norm_eps=float(text.get("rms_norm_eps", 1e-6)),
      self_conditioning=True,
      self_conditioning_dim=0,
      canvas_input_norm=True,
      max_positions=int(text.get("max_position_embeddings") or 0),
  )
  if "canvas_input_norm" not in {f.name for f in dataclasses.fields(ModelConfig)}:
    overrides.pop("canvas_input_norm")
  return overrides


def hf_config_from_model(cfg: ModelConfig, *, canvas_length: int = 256) -> dict[str, Any]:
  """A `DiffusionGemmaConfig` dict (config.json, text part only) that `transformers` builds our model from; its
  max_position_embeddings is `cfg.max_positions` (left out when 0: the export sets it, `export_hf`)."""
  problems = []
  if not cfg.global_k_eq_v and "global" in cfg.layer_kinds:
    problems.append("model.global_k_eq_v=False: the reference's global layers always share K and V")
  if not cfg.self_conditioning:
    problems.append("model.self_conditioning=False: the reference always has the self-conditioning MLP")
  if cfg.self_conditioning_dim not in (0, cfg.mlp_dim):
    problems.append(f"model.self_conditioning_dim={cfg.self_conditioning_dim}: the reference's self-conditioning "
                    f"MLP is model.mlp_dim={cfg.mlp_dim} wide")
  if cfg.rope_fraction != 1.0:
    problems.append(f"model.rope_fraction={cfg.rope_fraction}: the reference's sliding layers rotate every dim")
  if cfg.layer_kinds[-1] != "global":
    problems.append("the last layer must be global (the reference forces it)")
  if cfg.token_shift:
    problems.append("model.token_shift=True: the reference reads each canvas position's prediction at that "
                    "position, so it would sample this model's predictions one slot off")
  if problems:
    raise MappingError("cannot export to the Hugging Face layout: " + "; ".join(problems))
  layer_types = [LAYER_KIND_TO_HF[k] for k in cfg.layer_kinds]
  per_layer = {str(i): {"head_dim": cfg.global_head_dim, "num_key_value_heads": cfg.global_num_kv_heads}
               for i, k in enumerate(cfg.layer_kinds) if k == "global"}
  text = {
      "model_type": "diffusion_gemma_text",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.embed_dim,
      "intermediate_size": cfg.mlp_dim,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_activation": "gelu_pytorch_tanh",
      "rms_norm_eps": cfg.norm_eps,
      "sliding_window": cfg.sliding_window,
      "layer_types": layer_types,
      "per_layer_config": per_layer,
      "rope_parameters": {
          "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_base},
          "full_attention": {"rope_type": "proportional", "rope_theta": cfg.global_rope_base,
                             "partial_rotary_factor": cfg.global_rope_fraction},
      },
      "num_experts": cfg.num_experts,
      "top_k_experts": cfg.top_k,
      "moe_intermediate_size": cfg.expert_dim,
      "final_logit_softcapping": cfg.logit_softcap,
      "attention_bias": False,
      "tie_word_embeddings": True,
      "use_bidirectional_attention": None,
  }
  if cfg.max_positions:  # without it transformers assumes 131072 (DiffusionGemmaTextConfig's default)
    text["max_position_embeddings"] = cfg.max_positions
  return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
          "text_config": text, "tie_word_embeddings": True, "canvas_length": canvas_length}


# ---- tensors -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
  """Our parameter `path` <- the HF tensors `hf_names` (one, or two joined on the last axis)."""
  path: tuple
  hf_names: tuple[str, ...]
  to_ours: Callable[..., np.ndarray]  # hf arrays -> ours
  to_hf: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # ours -> hf arrays (same order as hf_names)


def _same(x):
  return x


def _linear_to_ours(shape):
  """torch Linear [out, in] -> ours [in, *shape] (shape splits `out`)."""
  return lambda w: np.ascontiguousarray(w.T).reshape((w.shape[1],) + tuple(shape))


def _linear_to_hf(w):
  return (np.ascontiguousarray(w.reshape(w.shape[0], -1).T),)


def _join_gate_up(gate, up):
  return np.concatenate([gate.T, up.T], axis=1)


def _split_gate_up(w):
  gate, up = np.split(w, 2, axis=1)
  return np.ascontiguousarray(gate.T), np.ascontiguousarray(up.T)


def _o_to_ours(num_heads, head_dim):
  return lambda w: np.ascontiguousarray(w.T).reshape(num_heads, head_dim, w.shape[0])


def _o_to_hf(w):
  """ours [N, H, D] -> torch Linear [D, N*H]."""
  return (np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T),)


def _swap_last(w):
  return np.ascontiguousarray(np.swapaxes(w, -1, -2))


def layer_path(cfg: ModelConfig, layer: int, *rest) -> tuple:
  """Our path of layer `layer`'s parameter: units/<repeat>/blocks/<i>/... (scan_layers: stacked_unit, axis 0)."""
  repeat, index = divmod(layer, len(cfg.layer_pattern))
  if cfg.scan_layers:
    return ("stacked_unit", "blocks", index) + rest + (("layer", repeat),)
  return ("units", repeat, "blocks", index) + rest


def rules(cfg: ModelConfig) -> list[Rule]:
  """Every parameter of a model built from `cfg`, with its HF tensors (decoder names) and both transforms."""
  out = [Rule(("embedder", "embedding"), (DECODER + "embed_tokens.weight",), _same, lambda x: (x,)),
         Rule(("final_norm", "scale"), (DECODER + "norm.weight",), _same, lambda x: (x,))]
  if cfg.self_conditioning:
    sc = DECODER + "self_conditioning."
    out += [Rule(("self_conditioning", "pre_norm", "scale"), (sc + "pre_norm.weight",), _same, lambda x: (x,)),
            Rule(("self_conditioning", "w_gate_up"), (sc + "gate_proj.weight", sc + "up_proj.weight"),
                 _join_gate_up, _split_gate_up),
            Rule(("self_conditioning", "w_down"), (sc + "down_proj.weight",), lambda w: w.T.copy(),
                 lambda w: (w.T.copy(),))]
  N = cfg.num_heads
  for layer, kind in enumerate(cfg.layer_kinds):
    H, K, k_eq_v = cfg.attention_dims(kind)
    p = f"{DECODER}layers.{layer}."
    a = p + "self_attn."
    path = lambda *rest: layer_path(cfg, layer, *rest)  # noqa: E731 (bound per iteration below)
    out += [Rule(path("attn", "q_proj"), (a + "q_proj.weight",), _linear_to_ours((N, H)), _linear_to_hf),
            Rule(path("attn", "k_proj"), (a + "k_proj.weight",), _linear_to_ours((K, H)), _linear_to_hf),
            Rule(path("attn", "o_proj"), (a + "o_proj.weight",), _o_to_ours(N, H), _o_to_hf),
            Rule(path("attn", "q_norm", "scale"), (a + "q_norm.weight",), _same, lambda x: (x,)),
            Rule(path("attn", "k_norm", "scale"), (a + "k_norm.weight",), _same, lambda x: (x,))]
    if not k_eq_v:
      out.append(Rule(path("attn", "v_proj"), (a + "v_proj.weight",), _linear_to_ours((K, H)), _linear_to_hf))
    out += [Rule(path(ours, "scale"), (p + theirs + ".weight",), _same, lambda x: (x,))
            for ours, theirs in BLOCK_NORMS.items()]
    out += [Rule(path("layer_scalar"), (p + "layer_scalar",), _same, lambda x: (x,)),
            Rule(path("mlp", "w_gate_up"), (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                 _join_gate_up, _split_gate_up),
            Rule(path("mlp", "w_down"), (p + "mlp.down_proj.weight",), lambda w: w.T.copy(), lambda w: (w.T.copy(),)),
            Rule(path("moe", "router_w"), (p + "router.proj.weight",), lambda w: w.T.copy(), lambda w: (w.T.copy(),)),
            Rule(path("moe", "router_scale"), (p + "router.scale",), _same, lambda x: (x,)),
            Rule(path("moe", "per_expert_scale"), (p + "router.per_expert_scale",), _same, lambda x: (x,)),
            Rule(path("moe", "w_gate_up"), (p + "experts.gate_up_proj",), _swap_last, lambda w: (_swap_last(w),)),
            Rule(path("moe", "w_down"), (p + "experts.down_proj",), _swap_last, lambda w: (_swap_last(w),))]
  return out


def aliases(cfg: ModelConfig) -> dict[str, str]:
  """Names that, when present, must equal a decoder tensor: the encoder's copies and the tied LM head."""
  out = {LM_HEAD: DECODER + "embed_tokens.weight"}
  for rule in rules(cfg):
    for name in rule.hf_names:
      if name.startswith(DECODER) and not name.startswith(DECODER + "self_conditioning."):
        out[ENCODER + name[len(DECODER):]] = name
  return out


def is_vision(name: str) -> bool:
  return name.startswith(VISION_PREFIXES)


def check_names(cfg: ModelConfig, names: Iterable[str]) -> dict[str, list[str]]:
  """Splits checkpoint `names` into what maps, what is an alias, what is vision; fails listing unknown/missing."""
  names = list(names)
  wanted = {n for r in rules(cfg) for n in r.hf_names}
  alias = aliases(cfg)
  unknown = sorted(n for n in names if n not in wanted and n not in alias and not is_vision(n))
  missing = sorted(wanted - set(names))
  if unknown or missing:
    msg = []
    if unknown:
      msg.append(f"{len(unknown)} unknown tensor(s): {', '.join(unknown)}")
    if missing:
      msg.append(f"{len(missing)} missing tensor(s): {', '.join(missing)}")
    raise MappingError("the checkpoint does not match the config: " + "; ".join(msg))
  return {"mapped": [n for n in names if n in wanted], "aliases": [n for n in names if n in alias],
          "vision": [n for n in names if is_vision(n)]}


def hf_tensors_from_params(cfg: ModelConfig, get_param: Callable[[tuple], np.ndarray], *,
                           with_encoder_buffers: bool = True):
  """Yields (hf_name, array) for every decoder tensor (and the encoder's `layer_scalar` buffers, which the
  reference saves separately); `get_param(path)` returns one of our parameters as numpy."""
  for rule in rules(cfg):
    arrays = rule.to_hf(np.asarray(get_param(rule.path)))
    for name, array in zip(rule.hf_names, arrays):
      yield name, array
      if with_encoder_buffers and name.endswith(".layer_scalar"):
        yield ENCODER + name[len(DECODER):], array


def split_layer_index(path: tuple) -> tuple[tuple, int | None]:
  """(our parameter path, index along its stacked "layers" axis or None) of a rule's path."""
  if path and isinstance(path[-1], tuple) and path[-1][0] == "layer":
    return path[:-1], path[-1][1]
  return path, None
