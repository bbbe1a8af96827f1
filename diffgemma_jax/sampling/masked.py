"""Masked-diffusion reverse processes: semi-autoregressive blocks, a commit schedule and an acceptance rule.

A canvas holds the prompt followed by `gen_length` mask tokens, filled block by block (LLaDA's semi-autoregressive
decoding). Each step asks a *canvas denoiser* for the logits of the current block only, proposes a token per masked
position (`parts.propose`), and the acceptance rule commits some of them:
- `low_confidence`: the `n` most confident, `n` from the even schedule over `steps_per_block` (LLaDA);
- `threshold`: every proposal with confidence >= `threshold`, and at least the schedule's `n` (with
  steps_per_block == block_length that is one: Fast-dLLM's parallel decoding).
The stopping rule is per row (`stop_at_eos`): a row whose finished blocks hold an EOS stops (its later positions
become EOS and it takes no more steps), and generation ends once every row has stopped. Rows move from block to
block together: one that finishes a block early waits for the others without counting model calls. Everything is
jitted with static shapes: one `lax.while_loop` over (block, step). A batch of prompts of different lengths is
left-padded (`batching.py`): the denoisers take each row's first prompt slot (`starts_B`) and never attend to
padding.

Canvas denoisers (`ModelDenoiser`):
- `cache="none"`: every step runs the whole canvas (exact; LLaDA).
- `cache="dual"`: Fast-dLLM's block-wise approximate KV cache (their DualCache). When a block starts (and every
  `refresh_every` steps, if > 0) the whole canvas runs once and every layer's keys/values are stored; the other
  steps of the block run only the block's tokens, attending to the stored keys/values of the prompt, the finished
  blocks and the still-masked later blocks. This is an approximation for a bidirectional denoiser: the stored
  entries were computed while the current block still held the masks of the refresh step (exact entries would
  need the whole canvas again). Fast-dLLM reports near-equal accuracy; `refresh_every=1` is exactly `none`.
- `cache="block"` (`BlockDenoiser`, models trained with the block objective): the prompt and each finished block
  are run once, clean and causally, as the model saw them in training; the cache is exact.
With `model.token_shift` a block's logits are the outputs one slot earlier (the slot before the block predicts its
first token): `none` unembeds from there, `dual` runs that slot with the block (b + 1 tokens a step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffgemma_jax.sampling.batching import real_slots, slot_mask, slot_positions, split_keys
from diffgemma_jax.sampling.parts import ACCEPTANCE_RULES, has_eos, masked_step, shifted

CACHE_MODES = ("none", "dual", "block")  # "block": block-diffusion models only (exact)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  gen_length: int = 128
  block_length: int = 32
  steps_per_block: int = 32
  acceptance: str = "low_confidence"
  threshold: float = 0.9
  temperature: float = 0.0
  cache: str = "none"
  refresh_every: int = 0  # with cache="dual": also refresh every this many steps inside a block (0: never)
  stop_at_eos: bool = True

  def __post_init__(self):
    if self.acceptance not in ACCEPTANCE_RULES:
      raise ValueError(f"sampler acceptance {self.acceptance!r} unknown; valid rules are {ACCEPTANCE_RULES}")
    if self.cache not in CACHE_MODES:
      raise ValueError(f"sampler cache {self.cache!r} unknown; valid modes are {CACHE_MODES}")
    if self.block_length < 1 or self.gen_length < 1 or self.gen_length % self.block_length:
      raise ValueError(f"gen_length={self.gen_length} must be a positive multiple of block_length="
                       f"{self.block_length}")
    if not 1 <= self.steps_per_block <= self.block_length:
      raise ValueError(f"steps_per_block={self.steps_per_block} must lie in [1, block_length={self.block_length}]")
    if not 0.0 < self.threshold <= 1.0:
      raise ValueError(f"threshold={self.threshold} must lie in (0, 1]")
    if self.temperature < 0 or self.refresh_every < 0:
      raise ValueError("temperature and refresh_every must be >= 0")

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length


# ---- canvas denoisers: (canvas, cache, block_start, refresh) -> (block logits [B, b, V], cache) ------------------
@dataclasses.dataclass(frozen=True)
class LogitsFnDenoiser:
  """Wraps a function of the whole canvas (tests, oracles); it has no cache."""
  logits_fn: Callable[[jax.Array], jax.Array]
  block_length: int

  def init(self, canvas_BS, prompt_length: int):
    del canvas_BS, prompt_length
    return (), 0

  def __call__(self, canvas_BS, cache, block_start, refresh):
    del refresh
    logits = self.logits_fn(canvas_BS)
    return jax.lax.dynamic_slice_in_dim(logits, block_start, self.block_length, axis=1), cache


@dataclasses.dataclass(frozen=True)
class ModelDenoiser:
  """A `Denoiser` with bidirectional attention over the canvas, uncached or with the approximate dual cache."""
  model: Any
  block_length: int
  cache: str = "none"
  starts_B: Any = None  # each row's first prompt slot (left padding); None: no padding

  def init(self, canvas_BS, prompt_length: int):
    del prompt_length
    return self.model.init_kv_cache(*canvas_BS.shape), 0

  def full(self, canvas_BS, cache, block_start):
    """The whole canvas through the model; stores every slot's keys/values, unembeds only the block's
    predictions (with `model.token_shift` the outputs one slot earlier)."""
    B, S = canvas_BS.shape
    positions_BS = slot_positions(B, S, self.starts_B)
    mask = slot_mask(B, S, 0, S, self.starts_B, causal=False)  # the whole sequence: a description, not [B, S, S]
    return self.model.decode(canvas_BS, positions_BS, mask, cache, positions_BS, 0,
                             logits_start=block_start - int(self.model.cfg.token_shift),
                             logits_length=self.block_length)

  def cached(self, canvas_BS, cache, block_start):
    """Only the block through the model (with `model.token_shift` also the slot before it, whose output predicts
    the block's first token), attending to the cached keys/values of every other slot."""
    B, S = canvas_BS.shape
    b = self.block_length
    shift = int(self.model.cfg.token_shift)
    start = block_start - shift
    positions_BS = slot_positions(B, S, self.starts_B)
    window_BW = jax.lax.dynamic_slice_in_dim(canvas_BS, start, b + shift, axis=1)
    window_positions_BW = jax.lax.dynamic_slice_in_dim(positions_BS, start, b + shift, axis=1)
    mask_BWS = jnp.broadcast_to(real_slots(B, S, self.starts_B)[:, None, :], (B, b + shift, S))
    return self.model.decode(window_BW, window_positions_BW, mask_BWS, cache, positions_BS, start,
                             logits_start=0, logits_length=b)

  def __call__(self, canvas_BS, cache, block_start, refresh):
    if self.cache == "none":
      return self.full(canvas_BS, cache, block_start)
    return jax.lax.cond(refresh, lambda c: self.full(canvas_BS, c, block_start),
                        lambda c: self.cached(canvas_BS, c, block_start), cache)


@dataclasses.dataclass(frozen=True)
class BlockDenoiser:
  """A block-diffusion (BD3-LM / DiffusionGemma layout) denoiser with an exact KV cache.

  The model was trained with canvas block i attending bidirectionally to itself and to the *clean* tokens before
  it, which attend causally among themselves. So the cache holds clean keys/values: the prompt is prefilled
  causally once (one call), each step runs only the canvas block against the clean slots before it, and the first
  step of every later block also runs the just-finished block, clean and causally, in the same call (2 * b
  tokens), replacing its canvas entries. Nothing is approximate: every step equals recomputing the clean prefix.

  With `model.token_shift` the block's first token is predicted by the clean slot before the block: the prefill's
  last logits for block 0, the finished block's last clean logits (same call) for later blocks. The denoiser's
  cache is (keys/values, those logits [B, 1, V])."""
  model: Any
  block_length: int
  first_block_start: int  # the prompt length: blocks start there
  starts_B: Any = None  # each row's first prompt slot (left padding); None: no padding

  def init(self, canvas_BS, prompt_length: int):
    B, S = canvas_BS.shape
    positions_BS = slot_positions(B, S, self.starts_B)
    causal_BPS = ((jnp.arange(S)[None, None, :] <= jnp.arange(prompt_length)[None, :, None])
                  & real_slots(B, S, self.starts_B)[:, None, :])
    before, cache = self.model.decode(canvas_BS[:, :prompt_length], positions_BS[:, :prompt_length], causal_BPS,
                                      self.model.init_kv_cache(B, S), positions_BS, 0,
                                      logits_start=prompt_length - 1, logits_length=1)
    return (cache, before), 1

  def _run(self, canvas_BS, cache, window_start, window_length: int, canvas_start, logits_start: int):
    """Runs slots [window_start, window_start + window_length): those before `canvas_start` as clean tokens
    (causal), the rest as the canvas block (sees every slot before the block's end). Returns the block_length
    logits from window position `logits_start` on."""
    B, S = canvas_BS.shape
    positions_BS = slot_positions(B, S, self.starts_B)
    window_BW = jax.lax.dynamic_slice_in_dim(canvas_BS, window_start, window_length, axis=1)
    positions_BW = jax.lax.dynamic_slice_in_dim(positions_BS, window_start, window_length, axis=1)
    slots_S = jnp.arange(S)
    query_W1 = window_start + jnp.arange(window_length)[:, None]  # the window's slots
    visible_WS = jnp.where(query_W1 < canvas_start, slots_S[None, :] <= query_W1,
                           slots_S[None, :] < canvas_start + self.block_length)
    mask_BWS = visible_WS[None] & real_slots(B, S, self.starts_B)[:, None, :]
    # Marks the canvas as the objective's canvas pass did (canvas input norm, the canvas's sliding window).
    canvas_BW = jnp.broadcast_to(query_W1[:, 0] >= canvas_start, (B, window_length))
    return self.model.decode(window_BW, positions_BW, mask_BWS, cache, positions_BS, window_start,
                             logits_start=logits_start, logits_length=self.block_length, canvas_BL=canvas_BW)

  def __call__(self, canvas_BS, cache, block_start, refresh):
    b = self.block_length
    cache, before = cache
    shift = self.model.cfg.token_shift

    def plain(c):
      logits, c = self._run(canvas_BS, c, block_start, b, block_start, 0)
      return (shifted(logits, before) if shift else logits), c

    if canvas_BS.shape[1] - self.first_block_start < 2 * b:  # one block: no finished block to commit (and a
      logits, cache = plain(cache)                           # 2b-slot window may not fit the canvas)
    else:
      # `refresh` is the first step of a block; block 0 follows the prefilled prompt, which is already clean.
      with_finished = lambda c: self._run(canvas_BS, c, jnp.maximum(block_start - b, 0), 2 * b, block_start,
                                          b - 1 if shift else b)
      is_later_block = refresh & (block_start - b >= self.first_block_start)
      logits, cache = jax.lax.cond(is_later_block, with_finished, plain, cache)
    # With token shift logits[:, 0] is the clean slot before the block (unchanged by plain steps).
    return logits, (cache, logits[:, :1] if shift else before)


def make_denoiser(model, cfg: "SamplerConfig", prompt_length: int, prompt_starts_B=None):
  """The canvas denoiser of `cfg.cache` for a model: bidirectional (none / dual) or block-causal (block).
  `prompt_starts_B`: each row's first prompt slot of a left-padded batch (None: no padding)."""
  if cfg.cache == "block":
    return BlockDenoiser(model, cfg.block_length, prompt_length, prompt_starts_B)
  return ModelDenoiser(model, cfg.block_length, cfg.cache, prompt_starts_B)


# ---- the loop --------------------------------------------------------------------------------------------------
def generate(denoiser, prompt_BP, rng, cfg: SamplerConfig, *, mask_id: int, eos_id: int | None = None):
  """Fills `cfg.gen_length` positions after each prompt; returns (canvas [B, P + G], model calls [B]).

  `denoiser` is a canvas denoiser (`ModelDenoiser`) or a plain function canvas -> logits [B, P + G, V]; `rng` one
  key or one per row (`batching.py`)."""
  if not hasattr(denoiser, "init"):
    denoiser = LogitsFnDenoiser(denoiser, cfg.block_length)
  B, P = prompt_BP.shape
  b = cfg.block_length
  canvas = jnp.concatenate([prompt_BP, jnp.full((B, cfg.gen_length), mask_id, prompt_BP.dtype)], axis=1)
  stop_at_eos = cfg.stop_at_eos and eos_id is not None

  def cond(state):
    _, _, _, block, _, _, finished_B = state
    return (block < cfg.num_blocks) & ~jnp.all(finished_B)

  def body(state):
    canvas, cache, rng, block, step, calls, finished_B = state
    rng, key = split_keys(rng)
    start = P + block * b
    block_tokens = jax.lax.dynamic_slice_in_dim(canvas, start, b, axis=1)
    candidates = (block_tokens == mask_id) & ~finished_B[:, None]
    refresh = step == 0
    if cfg.refresh_every > 0:
      refresh = refresh | (step % cfg.refresh_every == 0)
    logits, cache = denoiser(canvas, cache, start, refresh)
    tokens, commit = masked_step(logits, key, candidates, acceptance=cfg.acceptance, threshold=cfg.threshold,
                                 temperature=cfg.temperature, steps_left=cfg.steps_per_block - step, mask_id=mask_id)
    block_tokens = jnp.where(commit, tokens, block_tokens)
    canvas = jax.lax.dynamic_update_slice_in_dim(canvas, block_tokens, start, axis=1)
    calls = calls + jnp.any(candidates, axis=-1).astype(jnp.int32)
    block_done = ~jnp.any((block_tokens == mask_id) & ~finished_B[:, None])
    if stop_at_eos:  # a row stops after the block that holds its first EOS
      finished_B = finished_B | (block_done & has_eos(canvas, eos_id, start=P, stop=start + b))
    next_block = jnp.where(block_done, block + 1, block)
    next_step = jnp.where(block_done, 0, step + 1)
    return canvas, cache, rng, next_block, next_step, calls, finished_B

  cache, init_calls = denoiser.init(canvas, P)
  state = (canvas, cache, rng, jnp.int32(0), jnp.int32(0), jnp.full((B,), init_calls, jnp.int32),
           jnp.zeros((B,), bool))
  canvas, _, _, _, _, calls, _ = jax.lax.while_loop(cond, body, state)
  if stop_at_eos:  # blocks a row skipped after it ended
    canvas = jnp.where(canvas == mask_id, eos_id, canvas)
  return canvas, calls
