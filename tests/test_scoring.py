"""Scoring continuations (`diffgemma_jax/scoring.py`, `diffgemma-score`): the SFT layout against the SFT
evaluation's bound on the same pairs, the continuation rows, and bad records. The exact AR value against plain
causal passes is checked through the harness's loglikelihood requests (test_harness.py), which score these rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffgemma_jax.errors import ScoringError
from diffgemma_jax.scoring import continuation_row, read_pairs, summarize
from launch.score import main


def _write(path, lines):
  path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
  return str(path)


@pytest.fixture(scope="module")
def sft_pairs(tmp_path_factory):
  root = tmp_path_factory.mktemp("score")
  records = [{"prompt": f"def add_{i}(x):\n    \"\"\"Add {i}.\"\"\"\n", "response": f"    return x + {i}\n"}
             for i in range(60)]
  return _write(root / "pairs.jsonl", [json.dumps(r) for r in records]), root


def test_sft_layout_matches_the_sft_evaluation(trained_run, load_tiny, tiny_config_file, sft_pairs, tmp_path,
                                               capsys):
  """diffgemma-score --layout sft on the held-out pairs of an SFT dataset prints the bound diffgemma-eval reports
  for that held-out set (same rows, batches, seed and noise levels), to float32 rounding."""
  from diffgemma_jax.data.manifest import read_records
  from diffgemma_jax.evaluate import evaluate
  _, workdir, _ = trained_run
  source, root = sft_pairs
  overrides = {"data.recipe": "jsonl", "data.source": source, "data.dir": str(root / "ds"),
               "init.checkpoint": workdir, "eval.max_sequences": "0"}
  config = load_tiny(overrides)
  expected = evaluate(config, checkpoint=workdir)
  held_out = read_records(str(root / "ds"), "heldout")
  records = _write(tmp_path / "heldout.jsonl", [json.dumps({"prompt": r["prompt"], "continuation": r["response"]})
                                                for r in held_out])
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  assert main(["--config", tiny_config_file, "--workdir", workdir, "--records", records, "--layout", "sft",
               "--json"] + flags) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["summary"]["num_records"] == expected["num_examples"] == len(held_out) > 1
  assert report["summary"]["num_tokens"] == expected["num_tokens"]
  assert report["summary"]["bits_per_token"] == pytest.approx(expected["bits_per_token"], rel=1e-5)
  assert all(r["stderr"] > 0 for r in report["records"])  # a Monte-Carlo bound, not exact
  assert report["summary"] == summarize(report["records"])
  # the text report, the default layout (no template, no EOS padding: fewer tokens scored per record)
  assert main(["--config", tiny_config_file, "--workdir", workdir, "--records", records] + flags) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == len(held_out) + 1 and out[0].startswith(f"{records}:1: ") and "bits/token" in out[-1]
  assert "continuation layout" in out[-1]


@pytest.mark.parametrize("line,message", [
    (b'{"prompt": "x"}', "pairs.jsonl:2: missing field 'continuation'"),
    (b'{"prompt": "  ", "continuation": "y"}', "pairs.jsonl:2: 'prompt' must be a non-empty string"),
    (b'{"prompt": "caf\xe9", "continuation": "y"}', "pairs.jsonl:2: not valid UTF-8 (byte 0xe9 at byte 16)"),
    (b'["x", "y"]', "pairs.jsonl:2: expected an object"),
    (b'{"prompt": "x", ', "pairs.jsonl:2: not valid JSON"),
])
def test_bad_records_name_the_line(line, message, tmp_path, capsys):
  path = _write(tmp_path / "pairs.jsonl", [b'{"prompt": "a", "continuation": "b"}', line])
  with pytest.raises(ScoringError, match=message.replace("(", r"\(").replace(")", r"\)")):
    read_pairs(path)
  # the CLI: one line, exit 2, before any model is restored (the workdir has no checkpoint)
  code = main(["--config", "configs/pretrain_tiny.py", "--workdir", str(tmp_path), "--records", path])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_continuation_longer_than_the_context_is_refused():
  row = continuation_row([7] * 10, [8, 9], 8, bos_id=2, pad_id=0)  # the prompt loses tokens from the left
  np.testing.assert_array_equal(row["tokens"], [2, 7, 7, 7, 7, 7, 8, 9])
  np.testing.assert_array_equal(row["loss_mask"], [0, 0, 0, 0, 0, 0, 1, 1])
  row = continuation_row([7], [8], 6, bos_id=2, pad_id=0)
  np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 0, 0, 0])
  with pytest.raises(ScoringError, match="r.jsonl:3: the continuation is 8 tokens, more than the model's context"):
    continuation_row([7], [8] * 8, 8, bos_id=2, pad_id=0, source="r.jsonl:3")


def test_rows_are_scored_in_the_narrowest_width_that_holds_them(trained_run):
  """Short pairs go in rows of 16 (twice the rows per call), longer ones in the full 32: the same tokens scored,
  and each row's Monte-Carlo bound and standard error equal to its full-width row's, in other batches beside other
  rows (a row draws its noise by its own id and each token's index)."""
  from diffgemma_jax.sampling.requests import load_tokenizer
  from diffgemma_jax.scoring import Scorer, row_width
  from diffgemma_jax.train.reading import restore_model
  assert [row_width(n, 128) for n in (1, 16, 17, 100, 128)] == [16, 16, 32, 128, 128]
  assert [row_width(n, 96, unit=24) for n in (3, 17, 40, 90)] == [24, 48, 72, 96]  # whole canvases
  config, workdir, _ = trained_run
  model, _ = restore_model(config, workdir)
  scorer = Scorer(config, model, load_tokenizer(config, workdir), num_t_samples=16)
  shapes, bound_fn = [], scorer.bound_fn
  scorer.bound_fn = lambda params, batch, *keys: shapes.append(batch["tokens"].shape) or bound_fn(params, batch, *keys)
  rng = np.random.default_rng(0)
  id_pairs = [(list(rng.integers(10, 200, p)), list(rng.integers(10, 200, c)))
              for p, c in [(3, 4), (20, 5), (8, 6), (40, 9), (1, 12), (12, 2), (25, 6), (5, 3), (2, 8)]]
  bucketed = scorer.score_ids(id_pairs)
  assert shapes == [(8, 16), (4, 32)]  # 6 short rows in one call of 8, then 3 long ones in one of 4
  full = scorer.score_rows({k: np.stack([scorer.row(p, c)[k] for p, c in id_pairs]) for k in ("tokens",
                            "segment_ids", "positions", "loss_mask")})
  assert [r["num_tokens"] for r in bucketed] == [r["num_tokens"] for r in full] == [len(c) for _, c in id_pairs]
  for key in ("nll", "stderr"):
    np.testing.assert_allclose([b[key] for b in bucketed], [f[key] for f in full], rtol=2e-5, atol=1e-6)
  assert all(r["stderr"] > 0 for r in full)  # Monte-Carlo estimates, not exact scores


def test_a_file_is_scored_in_chunks_of_bounded_memory_to_the_same_scores(trained_run):
  """`Scorer.score` takes the records in chunks (rows of one chunk in memory, however long the file): chunks of 7
  give each of 20 pairs (two row widths) the score of one pass over all of them, and report each chunk's results
  as it ends, in order (then not kept)."""
  from diffgemma_jax.sampling.requests import load_tokenizer
  from diffgemma_jax.scoring import Pair, Scorer
  from diffgemma_jax.train.reading import restore_model
  config, workdir, _ = trained_run
  model, _ = restore_model(config, workdir)
  scorer = Scorer(config, model, load_tokenizer(config, workdir), num_t_samples=4)
  pairs = [Pair(f"def f_{i}(x):" + " x = x + 1;" * (i % 3), f" return x * {i}", f"pairs:{i + 1}") for i in range(20)]
  widths, bound_fn = set(), scorer.bound_fn
  scorer.bound_fn = lambda params, batch, *keys: widths.add(batch["tokens"].shape[1]) or bound_fn(params, batch, *keys)
  whole = scorer.score(pairs, chunk_records=len(pairs))
  assert len(widths) == 2
  seen, chunked = [], []
  kept = scorer.score(pairs, chunk_records=7, on_results=lambda start, got: seen.append((start, len(got))) or
                      chunked.extend(got))
  assert seen == [(0, 7), (7, 7), (14, 6)] and kept == []  # reported, not kept
  assert [r["source"] for r in chunked] == [p.source for p in pairs]
  assert [r["num_tokens"] for r in chunked] == [r["num_tokens"] for r in whole]
  for key in ("nll", "stderr", "nll_per_token"):
    np.testing.assert_allclose([r[key] for r in chunked], [r[key] for r in whole], rtol=2e-5, atol=1e-6)


def test_a_jsonl_output_keeps_each_record_and_a_rerun_scores_only_what_it_lacks(trained_run, tiny_config_file,
                                                                                 tmp_path, capsys, monkeypatch):
  """diffgemma-score --output FILE.jsonl: one line per record (its index, pair, scores, step), written as the
  records are scored; a job killed after 4 records (and half a line) run again scores the other 8 only, and every
  line and the report equal the plain run's; another --seed or other records are refused in one line."""
  from diffgemma_jax import scoring
  _, workdir, _ = trained_run
  records = _write(tmp_path / "pairs.jsonl", [json.dumps({"prompt": f"def f_{i}(x):", "continuation": f" return {i}"})
                                              for i in range(12)])
  base = ["--config", tiny_config_file, "--workdir", workdir, "--records", records, "--json"]
  scored = []
  score = scoring.Scorer.score
  monkeypatch.setattr(scoring.Scorer, "score", lambda self, pairs, **kw: scored.append(len(pairs)) or score(
      self, pairs, **kw))
  assert main(base) == 0
  plain = json.loads(capsys.readouterr().out)
  whole = tmp_path / "scores.jsonl"
  assert main(base + ["--output", str(whole)]) == 0
  assert json.loads(capsys.readouterr().out) == plain and scored == [12, 12]
  lines = whole.read_text().splitlines()
  assert [json.loads(line)["index"] for line in lines] == list(range(12))
  for line, record in zip(lines, plain["records"]):
    line = json.loads(line)
    assert line["step"] == plain["step"] and line["prompt"].startswith("def f_")
    assert {k: line[k] for k in record} == record
  killed = tmp_path / "killed.jsonl"
  killed.write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])
  assert main(base + ["--output", str(killed)]) == 0
  captured = capsys.readouterr()
  assert scored[-1] == 8 and "4 record(s) already scored, 8 to score" in captured.err
  assert json.loads(captured.out) == plain and killed.read_text().splitlines() == lines
  for flags, message in ((["--seed", "5"], "killed.jsonl:1 was made with other settings (workdir, --num_t_samples, "
                                           "--seed or --layout differ)"),):
    assert main(base + ["--output", str(killed)] + flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
  other = _write(tmp_path / "other.jsonl", [json.dumps({"prompt": "x", "continuation": "y"})])
  assert main(base[:5] + [other, "--json", "--output", str(killed)]) == 2
  assert "killed.jsonl:1 holds a result for another record than record 0 of these (another --records file?)" in \
      capsys.readouterr().err
