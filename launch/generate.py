"""diffgemma-generate --config FILE --workdir DIR (--prompt TEXT | --prompts FILE) [--sampler NAME] [--gen_length N]
[sampler options] [--chat [--system TEXT]] [--seed N] [--step N] [--batch_size N | --serving_slots N
[--serving_widths N]] [--stop TEXT ...] [--shard K/N] [--json] [--output FILE.json | FILE.jsonl]
[--config.a.b=value ...]: completes prompts with a trained model and reports, per request, the model calls, new
tokens and tokens/s, and for canvas samplers the denoising steps of every canvas. --batch_size N runs N prompts (of
any lengths) per sampler call, with the same results as one at a time; --serving_slots N keeps N requests in flight
instead (continuous batching), again with the same results. A large job: --output FILE.jsonl keeps each result as
its batch ends and the same command run again finishes the job; --shard K/N runs one share of it, and a launch of
N copies (srun on N nodes) splits it among them, process 0 gathering their shares into the file. Each model's
objective has a default sampler; canvas samplers decode canvas after canvas of objective.block_size tokens. A
sampler option the chosen sampler does not read is refused. The samplers and their options
(`diffgemma_jax/sampling/samplers.py`):"""

from __future__ import annotations

import argparse
import array
import dataclasses
import json
import re
import sys
from typing import Sequence

from diffgemma_jax import storage
from diffgemma_jax.data.sft import TEMPLATE_MARKERS, chat_prompt
from diffgemma_jax.errors import ConfigError, DataError
from diffgemma_jax.sampling import spool
from diffgemma_jax.sampling.requests import generate_completions
from diffgemma_jax.sampling.results_file import (ResultsFile, delete_parts, gather_parts, is_results_file, part_path,
                                                 spool_folder)
from diffgemma_jax.sampling.samplers import OPTIONS, add_flags, describe, requested_options
from diffgemma_jax.train.reading import parse_step
from .common import Outputs, config_overrides, fail, json_array, json_safe, load_run_config


# the fields of each request in the JSON document (--json, --output)
JSON_KEYS = ("index", "prompt", "completion", "sampler", "step", "weights", "prompt_tokens", "gen_length", "new_tokens",
             "model_calls", "seconds", "tokens_per_s", "compile_seconds", "steps_per_canvas", "ids", "batch_size",
             "batch_tokens_per_s")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="diffgemma-generate", description=__doc__ + "\n" + describe(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True, help="config file of the run, optionally path.py:arg")
  p.add_argument("--workdir", required=True, help="the training workdir holding checkpoints/")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="one prompt")
  source.add_argument("--prompts", help="a UTF-8 file (local or a bucket URL) with one prompt per line (\\n in a "
                      "line is a newline, \\\\ a backslash), or a .jsonl file with one JSON string or "
                      "{\"prompt\": ..., \"gen_length\": N} object per line (gen_length optional: that "
                      "prompt's own --gen_length)")
  p.add_argument("--gen_length", type=int, default=None, help="new tokens to generate (at most; default: what fits "
                 "in the model's context after the prompt, at most 128)")
  add_flags(p)
  p.add_argument("--chat", action="store_true", help="each prompt is a user turn: wrap it in the config's "
                 "data.chat_template (as SFT did), ending with the model turn's header")
  p.add_argument("--system", default=None, help="with --chat: a system turn before the user turn")
  p.add_argument("--seed", type=int, default=0, help="every request's seed (a request's sample never depends on "
                 "the batch it runs in)")
  p.add_argument("--batch_size", type=int, default=1, help="prompts per sampler call (default 1); prompts of "
                 "similar lengths share a batch")
  p.add_argument("--serving_slots", type=int, default=None, help="continuous batching (every sampler but "
                 "block_fused*): keep N requests in flight, each finished one's slot refilled with the next "
                 "prompt at once; the same results as one at a time (replaces --batch_size)")
  p.add_argument("--serving_widths", type=int, default=None, help="with --serving_slots and a masked sampler "
                 "(threshold, low_confidence_cached, threshold_nocache, low_confidence): each model call runs at the "
                 "narrowest of N slot widths holding its requests (default 4); more: less work per call and more "
                 "programs to compile (each when a call first needs it)")
  p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="end a completion before this text "
                 "(repeatable)")
  p.add_argument("--step", default=None, help="checkpoint step (default: the latest; best: the one of lowest "
                 "recorded held-out bound)")
  p.add_argument("--shard", default=None, metavar="K/N", help="run the requests whose position among the prompts is "
                 "K modulo N only (0 <= K < N): one share of a job split over N commands, e.g. a job array's tasks, "
                 "each with its own --output; each result is the one the whole job gives")
  p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
  p.add_argument("--output", default=None, help="also write the JSON document (as --json prints it) here: a local "
                 "file or a bucket URL (s3://..., gs://...). A name ending in .jsonl keeps one line per request "
                 "as each batch ends, and the same command run again generates only the requests it lacks")
  return p


def _parse_shard(text: str | None) -> tuple[int, int]:
  if text is None:
    return 0, 1
  match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
  if not match or not int(match[1]) < int(match[2]):
    raise ConfigError(f"--shard {text!r}: give K/N with 0 <= K < N (this command's share of N)")
  return int(match[1]), int(match[2])


def _unescape(line: str) -> str:
  return re.sub(r"\\([\\n])", lambda m: "\n" if m.group(1) == "n" else "\\", line)


class _GenLengths(Sequence):
  """Each request's own gen_length or None (--gen_length's), 8 bytes a request."""

  def __init__(self):
    self.values = array.array("q")

  def append(self, value: int | None) -> None:
    self.values.append(0 if value is None else value)  # a given gen_length is >= 1

  def __getitem__(self, index) -> int | None:
    return self.values[index] or None

  def __len__(self) -> int:
    return len(self.values)


class _Sources(Sequence):
  """Where each request came from, "--prompts FILE:LINE" (blank lines are skipped: a line number a request)."""

  def __init__(self, where: str):
    self.where, self.lines = where, array.array("q")

  def __getitem__(self, index) -> str:
    return f"{self.where}:{self.lines[index]}"

  def __len__(self) -> int:
    return len(self.lines)


def _read_requests(args, wrap=None, folder: str | None = None) -> tuple[Sequence[str], Sequence[int | None],
                                                                         Sequence[str]]:
  """--prompt, or the requests of the --prompts file: text lines (blank ones skipped) or JSONL (a string, or an
  object with "prompt" and optionally its own "gen_length"): (prompts, each one's gen_length or None for
  --gen_length's, where each came from); each prompt `wrap(text)` (a chat turn) where given. The file's prompts
  are read in one pass into a spool file in `folder` (`spool.Texts`, wrapped as each is read back; None: the
  temporary folder), never held in memory: a job may have ten million."""
  if args.prompt is not None:
    return [args.prompt if wrap is None else wrap(args.prompt)], [None], ["--prompt"]
  jsonl = args.prompts.endswith(".jsonl")
  prompts, gen_lengths, sources = spool.Texts(folder, "--prompts spool"), _GenLengths(), _Sources(
      f"--prompts {args.prompts}")
  with storage.open_input(args.prompts, "--prompts") as f:
    for number, raw in enumerate(f, 1):
      where = f"{sources.where}:{number}"
      try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
      except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
      if not line.strip():
        continue
      gen_length = None
      if not jsonl:
        prompt = _unescape(line)
      else:
        try:
          record = json.loads(line)
        except ValueError as e:
          raise ConfigError(f"{where}: not valid JSON ({e})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(prompt, str):
          raise ConfigError(f"{where}: expected a JSON string or an object with a string 'prompt', got "
                            f"{type(prompt).__name__}")
        if isinstance(record, dict) and record.get("gen_length") is not None:
          gen_length = record["gen_length"]
          if isinstance(gen_length, bool) or not isinstance(gen_length, int) or gen_length < 1:
            raise ConfigError(f"{where}: field 'gen_length' must be a whole number >= 1 (new tokens for this "
                              f"prompt), got {json.dumps(gen_length)}")
      prompts.append(prompt)
      gen_lengths.append(gen_length)
      sources.lines.append(number)
  return prompts if wrap is None else spool.Mapped(prompts, wrap), gen_lengths, sources


def main(argv=None) -> int:
  args, rest = _parser().parse_known_args(argv)
  try:
    step = parse_step(args.step, "--step")
    config = load_run_config(args.config, config_overrides(rest))
    outputs = Outputs(config)
    outputs.check(args.output, "--output")  # before the generation, not after it
    given = {flag: getattr(args, flag) for flag in OPTIONS}
    options = requested_options(args.sampler, str(config.objective.name), given, gen_length=args.gen_length,
                                seed=args.seed)
    if args.system and not args.chat:
      raise ConfigError("--system: only with --chat")
    wrap = (lambda text: chat_prompt(text, str(config.data.chat_template), args.system)) if args.chat else None
    folder = spool_folder(args.output) if is_results_file(args.output) else None  # beside the results
    prompts, gen_lengths, sources = _read_requests(args, wrap, folder)
    template = str(config.data.chat_template) if args.chat else None
    shard, shards = _parse_shard(args.shard)
    # A launch of several copies (srun on every node) with a results file and no --shard: copy K runs share K and
    # keeps it in a part file of its own; process 0 keeps its share in the file itself and gathers the others'.
    split = args.shard is None and outputs.count > 1 and is_results_file(args.output)
    if split:
      shard, shards = outputs.index, outputs.count
    positions = range(shard, len(prompts), shards)
    share = len(positions)
    kept = None
    if is_results_file(args.output):
      settings = {"workdir": storage.resolve(args.workdir), "options": dataclasses.asdict(options),
                  "stop": args.stop, "chat_template": template, "system": args.system}
      kept = ResultsFile(args.output, prompts, settings, write=outputs.first)
      if split and not outputs.first:
        own = part_path(args.output, shard, shards)
        storage.check_writable(own, "--output")
        positions = kept.pending(positions)  # a job this launch ran before, finished or not: what process 0 gathered
        kept = ResultsFile(own, prompts, settings)
      positions = kept.pending(positions)
      if len(positions) < share:
        print(f"{kept.path}: {share - len(positions)} request(s) already done, {len(positions)} to run",
              file=sys.stderr)

    def finish(index, result):
      if template and template != "plain":  # the model's turn ends at its closing marker (then EOS)
        result["completion"] = result["completion"].split(TEMPLATE_MARKERS[template][1])[0]
      result["index"] = index
      if kept is not None:
        kept.add(index, json_safe({k: result[k] for k in JSON_KEYS}))

    results = generate_completions(config, args.workdir, prompts, options, step=step, chat_template=template,
                                   batch_size=args.batch_size, stop=args.stop, serving_slots=args.serving_slots,
                                   serving_widths=args.serving_widths, gen_lengths=gen_lengths, sources=sources,
                                   only=positions, on_result=None if kept is None else finish,
                                   spool_folder=folder)
    if kept is None:
      for index, result in zip(positions, results):
        finish(index, result)
    elif split and outputs.first:  # every result of the job, once the other copies' shares are in
      kept.finish()  # this copy's share on disk before the wait
      gather_parts(kept, prompts, settings, shards, say=lambda text: print(text, file=sys.stderr, flush=True))
      results = kept.finish()
      delete_parts(args.output, shards)
    elif split:
      if kept.records:  # (none when the file held this copy's whole share: no part to leave behind)
        kept.finish()
      results = []
    else:  # every result of this share, those of earlier runs included, in order
      results = (r for r in kept.finish() if r["index"] % shards == shard)
  except (ConfigError, DataError) as e:
    return fail(str(e))
  if kept is None:  # the results in memory: one document, written and printed
    document = json.dumps(json_safe([{k: r[k] for k in JSON_KEYS} for r in results]), indent=2, allow_nan=False)
    outputs.write(args.output, document + "\n")
    lines = [document]
  else:  # read from the results file's lines as they are printed: a million requests never held whole as objects
    lines = json_array(json_safe({k: r[k] for k in JSON_KEYS}) for r in results)
  if args.json:
    for line in lines:
      outputs.print(line)
    return 0
  rate = lambda x: "inf" if x is None else f"{x:.1f}"  # noqa: E731 -- None: infinite, read back from a .jsonl
  for r in results:
    canvases = "" if r["steps_per_canvas"] is None else f", steps per canvas {r['steps_per_canvas']}"
    outputs.print(f"=== request {r['index']}: {r['new_tokens']} new tokens, {r['model_calls']} model calls{canvases}, "
                  f"{rate(r['tokens_per_s'])} tokens/s ({r['seconds']:.3f} s; compile {r['compile_seconds']:.1f} s; "
                  f"sampler {r['sampler']}, step {r['step']}"
                  + (" (moving average)" if r["weights"] == "ema" else "")
                  + (f"; batch of {r['batch_size']}: {rate(r['batch_tokens_per_s'])} tokens/s"
                     if r["batch_size"] > 1 else "")
                  + ")")
    outputs.print(r["prompt"] + r["completion"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
