"""Scoring continuations: the negative log-likelihood bound (nats) of a continuation given a prompt.

Each (prompt, continuation) pair becomes one row and the row's bound is the objective's `sequence_bound` through
`evaluate.make_bound_fn`, the estimator the SFT evaluation runs: the prompt is never corrupted or scored, the
continuation (`loss_mask`) is scored with `num_t_samples` stratified noise levels over the full [eps, 1] per row;
exact for the autoregressive objective (standard error 0). A row draws from fold_in(seed, a hash of its tokens)
(`data.pipeline.row_hashes`), so a pair's score is a function of the checkpoint, the seed and the pair alone: the
same in any batch, at any width, in any order of requests. Two row layouts:
  continuation  [bos] prompt continuation, then padding (segment 0: never attended, never scored), the tokens of
                the concatenated text (as a sampler reads it); what the lm-evaluation-harness asks for.
  sft           the SFT evaluation's own rows (`data/sft.make_rows` under the config's data.chat_template: the
                template's markers, the response followed by EOS padding to train.seq_len, all scored); the same
                pairs as an SFT held-out set score the same numbers.
A pair longer than the context loses prompt tokens from the left; a continuation that alone does not fit is an
error naming it.

Row widths (`continuation` layout): a pair is scored in the narrowest row of a ladder (powers of two from
MIN_WIDTH, whole canvases for the block objectives, at most train.seq_len) that holds it, with
`batch_size x seq_len / width` rows per call: the harness's requests are mostly far shorter than the context, and
a row padded to train.seq_len costs the whole row's compute. Each width compiles once. Padding is never attended
or scored, and a diffusion row draws each token's noise by the token's index in the row, so no score depends on
its row's width.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import json
import math
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffgemma_jax import storage
from diffgemma_jax.data.pipeline import ArrayRows, EvalBatches
from diffgemma_jax.data.sft import make_rows, split_tokens
from diffgemma_jax.errors import ScoringError
from diffgemma_jax.model.masks import make_mask
from diffgemma_jax.model.transformer import abstract_model
from diffgemma_jax.objectives import make_objective
from diffgemma_jax.parallel.mesh import batch_slice, mesh_from_config
from diffgemma_jax.parallel.placement import placement_for
from diffgemma_jax.parallel.rules import replicated
from diffgemma_jax.sampling import spool
from diffgemma_jax.sampling.results_file import SCORING, ResultsFile, spool_folder
from diffgemma_jax.train.bound import global_batch, make_bound_fn, scored_batches
from diffgemma_jax.train.bound_partial import from_process_0
from diffgemma_jax.train.dataset import load_tokenizer, sft_pack_unit
from diffgemma_jax.train.reading import restore_model_run
from diffgemma_jax.train.state import split_model

LAYOUTS = ("continuation", "sft")
MIN_WIDTH = 16
CHUNK_TOKENS = 1 << 24  # `Scorer.score` takes records in chunks of about this many row tokens (bounded memory)


def row_width(length: int, seq_len: int, unit: int = 1) -> int:
  """The narrowest width of the ladder that holds `length` tokens: the next power of two (at least MIN_WIDTH),
  rounded up to whole `unit`s (canvases), at most `seq_len` (itself whole units)."""
  width = max(MIN_WIDTH, 1 << max(0, (length - 1).bit_length()))
  return min(-(-width // unit) * unit, seq_len)


@dataclasses.dataclass(frozen=True)
class Pair:
  prompt: str
  continuation: str
  source: str = ""  # where it came from (file:line), for errors


class Pairs(Sequence[Pair]):
  """A records file's pairs, spooled to disk as they are read (`sampling/spool.py`: a scoring job of ten million
  records held them all as strings); memory holds where each lies and its line (16 bytes a pair)."""

  def __init__(self, path: str, folder: str | None = None):
    self.path, self.records, self.lines = path, spool.Records(folder, "--records spool"), array.array("q")

  def append(self, prompt: str, continuation: str, line: int) -> None:
    self.records.append(json.dumps([prompt, continuation], ensure_ascii=False).encode("utf-8"))
    self.lines.append(line)

  def __getitem__(self, index) -> Pair:
    prompt, continuation = json.loads(self.records[index])
    return Pair(prompt, continuation, f"{self.path}:{self.lines[index]}")

  def __len__(self) -> int:
    return len(self.records)


def read_pairs(path: str, flag: str = "--records", folder: str | None = None) -> Pairs:
  """The {"prompt", "continuation"} records of a JSONL file (local or a bucket URL), spooled in `folder` (`Pairs`;
  None: the temporary folder); any bad line is an error naming file and line, a file that cannot be opened one
  naming `flag`."""
  pairs = Pairs(path, folder)
  with storage.open_input(path, flag) as f:
    for number, raw in enumerate(f, 1):
      where = f"{path}:{number}"
      try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise ScoringError(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at byte {e.start + 1})") from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        raise ScoringError(f"{where}: not valid JSON ({e})") from None
      if not isinstance(record, dict):
        raise ScoringError(f"{where}: expected an object with 'prompt' and 'continuation', got "
                           f"{type(record).__name__}")
      for field in ("prompt", "continuation"):
        if field not in record:
          raise ScoringError(f"{where}: missing field {field!r} (a record is {{\"prompt\": ..., \"continuation\": "
                             f"...}}; got keys {sorted(record)})")
        if not isinstance(record[field], str) or not record[field].strip():
          raise ScoringError(f"{where}: {field!r} must be a non-empty string")
        try:
          record[field].encode("utf-8")
        except UnicodeEncodeError:
          raise ScoringError(f"{where}: {field!r} holds a lone surrogate (not valid Unicode)") from None
      pairs.append(record["prompt"], record["continuation"], number)
  if not len(pairs):
    raise ScoringError(f"{path}: no records; write one {{\"prompt\": ..., \"continuation\": ...}} object per line")
  return pairs


def row_length(prompt_ids: Sequence[int], continuation_ids: Sequence[int], seq_len: int, source: str = "") -> int:
  """Tokens of the pair's row in a context of `seq_len`: bos, the prompt's last tokens that fit, the continuation."""
  if not continuation_ids:
    raise ScoringError(f"{source or 'a pair'}: the continuation has no tokens")
  room = seq_len - 1 - len(continuation_ids)
  if room < 0:
    raise ScoringError(f"{source or 'a pair'}: the continuation is {len(continuation_ids)} tokens, more than the "
                       f"model's context of {seq_len} (train.seq_len) less bos; shorten it")
  return 1 + min(len(prompt_ids), room) + len(continuation_ids)


def continuation_row(prompt_ids: Sequence[int], continuation_ids: Sequence[int], seq_len: int, *, bos_id: int,
                     pad_id: int, source: str = "") -> dict[str, np.ndarray]:
  """[bos] prompt continuation in a row of `seq_len`, `loss_mask` on the continuation, segment 0 after it; the
  prompt loses tokens from the left when the pair does not fit."""
  length = row_length(prompt_ids, continuation_ids, seq_len, source)
  head = [bos_id] + list(prompt_ids)[len(prompt_ids) + len(continuation_ids) + 1 - length:]
  tokens = np.full((seq_len,), pad_id, np.int32)
  tokens[:length] = head + list(continuation_ids)
  loss_mask = np.zeros((seq_len,), np.int32)
  loss_mask[len(head):length] = 1
  segments = (np.arange(seq_len) < length).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segments, "positions": np.arange(seq_len, dtype=np.int32) * segments,
          "loss_mask": loss_mask}


class Scorer:
  """Continuation bounds of a model under its run config, `batch_size` rows per call (one compile); `batch_flag`
  names where batch_size came from in the error a mesh it does not fit gives."""

  def __init__(self, config, model, tokenizer, *, num_t_samples: int | None = None, batch_size: int | None = None,
               seed: int | None = None, layout: str = "continuation", batch_flag: str = "--batch_size"):
    if layout not in LAYOUTS:
      raise ScoringError(f"--layout {layout!r} is unknown; valid layouts are {', '.join(LAYOUTS)}")
    self.num_t_samples = int(config.eval.num_t_samples if num_t_samples is None else num_t_samples)
    self.batch_size = int(config.eval.batch_size if batch_size is None else batch_size)
    self.seed = int(config.eval.seed if seed is None else seed)
    if self.num_t_samples < 1 or self.batch_size < 1:
      raise ScoringError(f"--num_t_samples ({self.num_t_samples}) and --batch_size ({self.batch_size}) must be >= 1")
    self.config, self.tokenizer, self.layout = config, tokenizer, layout
    self.seq_len = int(config.train.seq_len)
    self.objective = make_objective(config.objective, mask_id=tokenizer.mask_id)
    self.mesh = mesh_from_config(config, training=False, eval_batch=(self.batch_size, batch_flag))
    # A mesh spanning processes (a joined diffgemma-score): each loads its slice of every batch's rows (the
    # data-parallel size, which divides batch_size, is a multiple of the slice count)
    self.slice_index, self.num_slices = batch_slice(self.mesh)
    self.graphdef, self.params = split_model(model)
    placed, _ = split_model(abstract_model(model.cfg, placement_for(self.mesh, config)))  # the bound runs on the mesh
    self.bound_fn = make_bound_fn(placed, self.objective, num_t_samples=self.num_t_samples, mesh=self.mesh)
    self._greedy_fn = None

  # ---- rows ----------------------------------------------------------------------------------------------------
  def rows(self, pairs: Sequence[Pair]) -> dict[str, np.ndarray]:
    """The rows of `pairs` under the layout, stacked [N, seq_len]."""
    if self.layout == "sft":
      rows, _ = make_rows([{"prompt": p.prompt, "response": p.continuation} for p in pairs], self.tokenizer,
                          self.seq_len, str(self.config.data.chat_template), pack_unit=sft_pack_unit(self.config),
                          alone=True)
      return rows
    return _stack([self.row(*self.ids(pair), pair.source) for pair in pairs])

  def ids(self, pair: Pair) -> tuple[list[int], list[int]]:
    return split_tokens(self.tokenizer, pair.prompt, pair.continuation)

  def row(self, prompt_ids, continuation_ids, source: str = "", width: int | None = None) -> dict[str, np.ndarray]:
    """The pair's `continuation` row, `width` wide (default train.seq_len; narrower only if it holds the row)."""
    length = row_length(prompt_ids, continuation_ids, self.seq_len, source)  # the context's truncation
    width = width or self.seq_len
    if not length <= width <= self.seq_len:
      raise ValueError(f"a row of {length} tokens in a width of {width} (train.seq_len={self.seq_len})")
    return continuation_row(prompt_ids, continuation_ids, width, bos_id=self.tokenizer.bos_id,
                            pad_id=self.tokenizer.pad_id, source=source)

  def batches(self, rows: dict[str, np.ndarray], rows_per_batch: int | None = None) -> EvalBatches:
    """Fixed-shape batches of `rows_per_batch` rows (default batch_size), the last one padded with empty rows,
    each made when it is read (the evaluation's `EvalBatches`)."""
    return EvalBatches(ArrayRows(rows), np.arange(len(rows["tokens"])), rows_per_batch or self.batch_size,
                       slice_index=self.slice_index, num_slices=self.num_slices)

  # ---- scores --------------------------------------------------------------------------------------------------
  def score_rows(self, rows: dict[str, np.ndarray], *, rows_per_batch: int | None = None) -> list[dict[str, Any]]:
    """Per row: nll (nats, the bound), stderr (its Monte-Carlo standard error; 0 when exact), num_tokens. Each row
    draws from fold_in(seed, its hash) (`bound.scored_batches`: fetched one batch behind)."""
    n = len(rows["tokens"])
    collected = [out for _, out in scored_batches(self.bound_fn, self.params, self.batches(rows, rows_per_batch),
                                                  seed=self.seed, mesh=self.mesh)]
    nll, stderr, tokens = (np.concatenate([c[i] for c in collected])[:n] for i in range(3))
    return [{"nll": float(a), "stderr": float(s), "num_tokens": int(t)} for a, s, t in zip(nll, stderr, tokens)]

  def score_ids(self, id_pairs: Sequence[tuple[Sequence[int], Sequence[int]]], sources: Sequence[str] = (), *,
                greedy: bool = False) -> list[dict[str, Any]]:
    """`score_rows` of (prompt ids, continuation ids) pairs as `continuation` rows, each in the narrowest width of
    the ladder that holds it (module docstring), results in the pairs' order; with `greedy`, each result's
    "greedy" is `greedy()` of its row."""
    sources = list(sources) or [""] * len(id_pairs)
    unit = self.objective.block_size if self.objective.capabilities.canvases else 1
    widths = [row_width(row_length(p, c, self.seq_len, source), self.seq_len, unit)
              for (p, c), source in zip(id_pairs, sources)]
    results: list[dict[str, Any]] = [{} for _ in id_pairs]
    for width in sorted(set(widths)):
      members = [i for i, w in enumerate(widths) if w == width]
      rows = _stack([self.row(*id_pairs[i], sources[i], width=width) for i in members])
      # the tokens of a batch of full rows, or fewer rows when that many would be mostly padding (a power of two
      # times batch_size, so a width compiles for few shapes)
      batches_needed = -(-len(members) // self.batch_size)
      per_batch = self.batch_size * min(self.seq_len // width, 1 << (batches_needed - 1).bit_length())
      scores = self.score_rows(rows, rows_per_batch=per_batch)
      flags = self.greedy(rows, rows_per_batch=per_batch) if greedy else [None] * len(members)
      for i, score, flag in zip(members, scores, flags):
        results[i] = dict(score, greedy=flag) if greedy else score
    return results

  def score(self, pairs: Sequence[Pair], *, chunk_records: int | None = None,
            on_results=None) -> list[dict[str, Any]]:
    """The pairs' scores (`score_ids` for the continuation layout, `score_rows` of full SFT rows), with each
    pair's source and nll per token. The pairs are taken in chunks of `chunk_records` (default: CHUNK_TOKENS of
    train.seq_len rows, a whole number of batches), so the rows in memory are one chunk's, whatever the file's
    size; `on_results(start, results)` receives each chunk's results (pairs start, start + 1, ...) as it ends,
    and they are then not kept (returned empty). `pairs` may be spooled (`Pairs`, a `spool.Take` of them): a chunk's
    are read as it starts. A pair's score does not depend on its chunk (module doc)."""
    chunk = chunk_records or max(CHUNK_TOKENS // self.seq_len // self.batch_size, 1) * self.batch_size
    results = []
    for start in range(0, len(pairs), chunk):
      part = [pairs[i] for i in range(start, min(start + chunk, len(pairs)))]
      if self.layout == "sft":
        scored = self.score_rows(self.rows(part))
      else:
        scored = self.score_ids([self.ids(pair) for pair in part], [pair.source for pair in part])
      for pair, result in zip(part, scored):
        result.update(source=pair.source, nll_per_token=result["nll"] / max(result["num_tokens"], 1))
      if on_results is not None:
        on_results(start, scored)
      else:
        results += scored
    return results

  def greedy(self, rows: dict[str, np.ndarray], rows_per_batch: int | None = None) -> list[bool]:
    """Objectives that predict the next token (`capabilities.next_token`: autoregressive models): whether greedy
    decoding from each row's prompt writes its continuation (every continuation token is the argmax after the
    tokens before it). None for diffusion models: their samplers commit tokens in a data-dependent order, so no
    single argmax pass answers it."""
    n = len(rows["tokens"])
    if not self.objective.capabilities.next_token:
      return [None] * n
    if self._greedy_fn is None:
      graphdef = self.graphdef

      @functools.partial(jax.jit, out_shardings=replicated(self.mesh))  # every process reads every row's answer
      def matches(params, batch):
        segments, positions = batch["segment_ids"], batch["positions"]
        logits, _ = nnx.merge(graphdef, params)(batch["tokens"], positions, make_mask("causal", segments, positions))
        hit = jnp.argmax(logits[:, :-1], axis=-1) == batch["tokens"][:, 1:]
        return jnp.all(hit | (batch["loss_mask"][:, 1:] == 0), axis=-1)

      self._greedy_fn = matches
    out = [np.asarray(self._greedy_fn(self.params, global_batch(batch, self.mesh, self.num_slices)))
           for batch in self.batches(rows, rows_per_batch)]
    return [bool(x) for x in np.concatenate(out)[:n]]


def _stack(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def summarize(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
  """Totals over scored records (one pass: they may be read from a results file as they come): nats, tokens, nats
  and bits per token (sum of bounds over sum of tokens)."""
  nats, tokens, count = 0.0, 0, 0
  for r in results:
    nats, tokens, count = nats + r["nll"], tokens + r["num_tokens"], count + 1
  per_token = nats / tokens if tokens else float("nan")
  return {"num_records": count, "num_tokens": tokens, "nll": nats, "nats_per_token": per_token,
          "bits_per_token": per_token / math.log(2)}


RESULT_KEYS = ("source", "nll", "stderr", "num_tokens", "nll_per_token")  # a record's result in the report


def score_file(config, workdir: str, path: str, *, step: int | None = None, results_path: str | None = None,
               write: bool = True, log=None, **scorer_options) -> dict[str, Any]:
  """Scores the records of a JSONL file with a run's checkpoint (`step`, default the latest): {"step", "weights"
  ("params", or "ema": the moving average, `checkpoint.weights`), "records":
  per-record results in file order, "summary"}. The records are read and checked before the model is restored.

  `results_path` (FILE.jsonl, local or a bucket URL; `sampling/results_file.py`): each record's result is kept
  there as its chunk of records ends (one JSON line, its `index` in the file), so a killed job loses at most a
  chunk, and the same call again scores only the records the file lacks (a record's score depends on the pair, the
  checkpoint and the settings alone). Only the process that writes (`write`: process 0 of a joined scoring) reads
  the file; the others take its list of what is done. "records" is then read back from the file's lines as it is
  iterated (a `spool.Mapped` of the file's `Results`: no result held in memory), the others' an empty list. `log`
  receives a line per chunk."""
  pairs = read_pairs(path, folder=spool_folder(results_path))  # beside the results file, if local
  if scorer_options.get("layout", "continuation") not in LAYOUTS:
    raise ScoringError(f"--layout {scorer_options['layout']!r} is unknown; valid layouts are {', '.join(LAYOUTS)}")
  tokenizer = load_tokenizer(config, workdir)
  model, run = restore_model_run(config, workdir, step)
  scorer = Scorer(config, model, tokenizer, **scorer_options)
  if results_path is None:
    results = scorer.score(pairs)
  else:
    results = _score_into(scorer, pairs, results_path, run, workdir, write=write, log=log or (lambda text: None))
  return {"step": run.step, "weights": run.weights, "objective": str(config.objective.name),
          "exact": scorer.objective.capabilities.exact,
          "num_t_samples": scorer.num_t_samples, "layout": scorer.layout, "records": results,
          "summary": summarize(results)}


def _score_into(scorer: Scorer, pairs: Sequence[Pair], results_path: str, run, workdir: str, *, write: bool,
                log) -> list[dict[str, Any]]:
  """`score_file` with a results file: the records it lacks scored, each kept as its chunk ends; every record's
  result in file order (process 0; the others: [])."""
  config = scorer.config
  settings = {"workdir": storage.resolve(workdir), "num_t_samples": scorer.num_t_samples, "seed": scorer.seed,
              "layout": scorer.layout, "seq_len": scorer.seq_len, "objective": config.objective.to_dict(),
              "chat_template": str(config.data.chat_template) if scorer.layout == "sft" else None}
  identities = spool.Mapped(pairs, lambda p: (p.prompt, p.continuation))  # what a results line must match
  kept = ResultsFile(results_path, identities, settings, kind=SCORING) if write else None
  done = set(json.loads(from_process_0(json.dumps(sorted(kept.records) if kept else []).encode()) or b"[]"))
  todo = array.array("q", (i for i in range(len(pairs)) if i not in done))
  if done:
    log(f"{results_path}: {len(done)} record(s) already scored, {len(todo)} to score")

  def keep(start: int, scored: list[dict[str, Any]]) -> None:
    for offset, result in enumerate(scored):
      index = todo[start + offset]
      if kept is not None:
        pair = pairs[index]
        kept.add(index, {"index": index, "prompt": pair.prompt, "continuation": pair.continuation,
                         **{k: result[k] for k in RESULT_KEYS}, "step": run.step, "weights": run.weights})
    log(f"scored {len(done) + start + len(scored)} of {len(pairs)} records")

  scorer.score(spool.Take(pairs, todo), on_results=keep)
  if kept is None:
    return []
  # every record's RESULT_KEYS in file order, parsed from the file's lines as it is iterated (`Results`): a job of
  # ten million records is never held as objects; iterable again
  return spool.Mapped(kept.finish(), lambda line: {k: line[k] for k in RESULT_KEYS})
