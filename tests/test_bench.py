"""Smoke tests of the CPU benchmark scripts that CI can afford (the GPU ones are in test_pallas_gmm.py)."""

import json
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_call_cost_reports_each_width_against_the_ar_step(capsys):
  sys.path.insert(0, str(REPO / "bench"))
  import call_cost  # pylint: disable=import-outside-toplevel
  assert call_cost.main(["--config", str(REPO / "configs" / "block_tiny.py"), "--widths", "16", "--calls", "4",
                         "--repeats", "1", "--rounds", "1", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  rows = {row["tokens_per_call"]: row for row in report["rows"]}
  assert sorted(rows) == [1, 16]  # the AR step is always measured
  assert rows[1]["x_ar_step"] == 1.0 and rows[1]["ms_per_call"] > 0
  assert rows[16]["x_ar_step"] == rows[16]["ms_per_call"] / rows[1]["ms_per_call"]
  assert rows[16]["tokens_per_call_for_2x"] == 2 * rows[16]["x_ar_step"]


def test_decode_step_reports_each_cache_length_against_the_shortest(capsys):
  sys.path.insert(0, str(REPO / "bench"))
  import decode_step  # pylint: disable=import-outside-toplevel
  assert decode_step.main(["--config", str(REPO / "configs" / "ar_tiny.py"), "--batch_sizes", "2", "--slots", "12,20",
                           "--steps", "4", "--repeats", "1", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert [(r["scan_layers"], r["slots"]) for r in report["rows"]] == [(False, 12), (False, 20), (True, 12), (True, 20)]
  for short, long in (report["rows"][:2], report["rows"][2:]):
    # x_shortest is rounded to 3 decimals: within 5e-4 of the ratio whatever its size (a loaded machine can make
    # the longer cache's step the faster one, a ratio near 0.3, where rel=1e-3 failed on the rounding alone)
    assert "us_per_slot" not in short and long["x_shortest"] == pytest.approx(
        long["ms_per_step"] / short["ms_per_step"], abs=1e-3)
    assert long["us_per_slot"] == pytest.approx(1e3 * (long["ms_per_step"] - short["ms_per_step"]) / 8, abs=0.02)  # 4-decimal ms


def test_generate_benchmark_runs_every_block_setting_against_the_ar_decoder(capsys):
  """bench/generate.py end to end at a tiny size (random weights: speed rows only): the AR row is the baseline,
  fixed step budgets make exactly that many calls (plus the prompt's prefill), threshold rows at least one token
  per call."""
  sys.path.insert(0, str(REPO / "bench"))
  import generate as bench_generate  # pylint: disable=import-outside-toplevel
  assert bench_generate.main(["--random_weights", "--gen_length", "32", "--block_length", "16", "--only",
                              "ar,block_fused threshold 0.9,block_fused low_confidence steps=8,"
                              "block_fused low_confidence steps=4", "--repeats", "1", "--quality_samples", "2", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  rows = {row["setting"]: row for row in report["results"]}
  assert set(rows) == {"ar", "block_fused threshold 0.9", "block_fused low_confidence steps=8",
                       "block_fused low_confidence steps=4"}, sorted(rows)
  assert rows["ar"]["model_calls"] == 32 and rows["ar"]["speedup_vs_ar"] == 1.0
  assert rows["block_fused low_confidence steps=8"]["model_calls"] == 8 + 1
  assert rows["block_fused low_confidence steps=4"]["model_calls"] == 4 + 1
  for name, row in rows.items():
    assert row["tokens_per_s"] > 0 and row["speedup_vs_ar"] > 0, name
    assert row["quality_samples"] == 2 and row["unigram_entropy"] > 0, name
    if "threshold" in name:
      assert 1 < row["model_calls"] <= 32 + 1, name


def test_generate_benchmark_time_budget_leaves_settings_out_and_still_reports(capsys):
  """Under gpu_check.sh's hard timeout the sampler step must end with its JSON: past --time_budget_s no new
  setting starts, and the report names each one left out."""
  sys.path.insert(0, str(REPO / "bench"))
  import generate as bench_generate  # pylint: disable=import-outside-toplevel
  assert bench_generate.main(["--random_weights", "--gen_length", "16", "--block_length", "16", "--only",
                              "ar,threshold 0.9", "--repeats", "1", "--time_budget_s", "1e-9", "--json"]) == 0
  captured = capsys.readouterr()
  report = json.loads(captured.out)
  assert report["results"] == [] and report["left_out_for_time"] == ["ar", "threshold 0.9"]
  assert "left out: --time_budget_s=1e-09 spent" in captured.err


def test_generate_benchmark_batched_table_pairs_each_batch_with_the_ar_decoder(monkeypatch, capsys):
  """--batch_sizes: total output tokens/s per batch size, each setting timed on B prompts and paired with the AR
  decoder on the same B prompts, against its own batch 1 (taken from the batch-1 table). The timings come from a
  stand-in for `time_setting` (seconds = B * setting number), so the table's arithmetic is checked, not a clock."""
  sys.path.insert(0, str(REPO / "bench"))
  import generate as bench_generate  # pylint: disable=import-outside-toplevel
  calls = []

  def fake_time_setting(generator, prompt, options, repeats, seed=0, paired=None):
    del generator, repeats, seed
    calls.append((getattr(options, "sampler", "block_fused"), prompt.shape))
    seconds = prompt.shape[0] * (2.0 if calls[-1][0] == "ar" else 3.0)
    if paired is not None:  # the AR run the setting is paired with: it runs on the same prompts
      paired_seconds = prompt.shape[0] * 2.0
      calls.append(("paired ar", prompt.shape))
    return {"seconds": seconds, "tokens_per_s": options.gen_length / seconds, "model_calls": 5, "sequence": [2] * 20,
            "steps_per_canvas": None, "paired_seconds": paired_seconds if paired is not None else None}

  monkeypatch.setattr(bench_generate, "time_setting", fake_time_setting)
  monkeypatch.setattr(bench_generate, "run_once", lambda *a: {"sequence": [2] * 20})
  assert bench_generate.main(["--random_weights", "--gen_length", "16", "--block_length", "16", "--only",
                              "ar,threshold 0.9", "--repeats", "1", "--batch_sizes", "4,1", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["batch_size"] == 1 and report["batch_sizes"] == [1, 4]
  # batch 1 once (the batch-1 table), then batch 4, every setting paired with the AR decoder on the same prompts
  assert calls == [("ar", (1, 32)), ("threshold", (1, 32)), ("paired ar", (1, 32)), ("ar", (4, 32)),
                   ("threshold", (4, 32)), ("paired ar", (4, 32))]
  batched = {(r["setting"], r["batch_size"]): r for r in report["batched"]}
  assert sorted(batched) == [("ar", 1), ("ar", 4), ("threshold 0.9", 1), ("threshold 0.9", 4)]
  assert batched[("threshold 0.9", 4)]["tokens_per_s"] == 4 * 16 / 12.0
  assert batched[("threshold 0.9", 4)]["speedup_vs_ar"] == 8.0 / 12.0
  assert batched[("threshold 0.9", 4)]["speedup_vs_batch_1"] == (4 * 16 / 12.0) / (16 / 3.0)
  assert batched[("ar", 4)]["speedup_vs_batch_1"] == 1.0 and batched[("ar", 1)]["speedup_vs_ar"] == 1.0


def _markov_log_prob_fn(transition_VV):
  """A next-token model that is an order-1 Markov chain: log p(x_{l+1} | x_<=l) = log M[x_l]."""
  log_m = np.log(transition_VV)
  return lambda tokens, segments: log_m[np.asarray(tokens)]


def test_parallel_pair_cost_is_the_mutual_information_plus_the_marginals_kl():
  """bench/parallel_ceiling.py's pair cost on a Markov chain, against the analytic value I(a; b) + E_a KL(q || p_a)
  (q the marginal of b), and zero when b does not depend on a."""
  sys.path.insert(0, str(REPO / "bench"))
  import parallel_ceiling  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  V = 6
  m = rng.dirichlet(np.full(V, 0.5), size=V)
  tokens, segments = np.array([1, 4, 2, 0, 0]), np.ones(5, np.int32)
  got = parallel_ceiling.pair_excess_nats(_markov_log_prob_fn(m), tokens, segments, t=2)
  p_a = m[tokens[2]]
  q = p_a @ m
  mutual_information = sum(p_a[a] * m[a, b] * np.log(m[a, b] / q[b]) for a in range(V) for b in range(V))
  kl = sum(p_a[a] * np.sum(q * np.log(q / m[a])) for a in range(V))
  np.testing.assert_allclose(got["excess_nats"], mutual_information + kl, rtol=1e-10)
  assert got["excess_nats"] > 0.1
  np.testing.assert_allclose(got["conditional_entropy_nats"], -np.sum(p_a[:, None] * m * np.log(m)), rtol=1e-10)
  independent = np.tile(rng.dirichlet(np.ones(V)), (V, 1))
  assert abs(parallel_ceiling.pair_excess_nats(_markov_log_prob_fn(independent), tokens, segments,
                                               t=2)["excess_nats"]) < 1e-12


def test_confidence_profile_counts_positions_inside_segments_only():
  sys.path.insert(0, str(REPO / "bench"))
  import parallel_ceiling  # pylint: disable=import-outside-toplevel
  probs = np.array([[0.95, 0.05], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])  # top: 0.95, 0.6, 0.5, 0.8
  log_probs = np.log(probs)[None]  # [1, 4, 2]; position 3 predicts past the row and is never scored
  tokens, segments = np.array([[0, 0, 1, 1]]), np.array([[1, 1, 1, 0]])  # position 2 -> 3 crosses into padding
  report = parallel_ceiling.confidence_profile(log_probs, tokens, segments, thresholds=(0.9, 0.5))
  assert report["positions"] == 2  # 0 -> 1 and 1 -> 2
  np.testing.assert_allclose(report["perplexity"], np.exp(-(np.log(0.95) + np.log(0.4)) / 2), rtol=1e-6)
  rows = {row["threshold"]: row for row in report["thresholds"]}
  assert rows[0.9]["fraction_confident"] == 0.5 and rows[0.9]["ceiling_tokens_per_call"] == 2.0
  assert rows[0.5]["fraction_confident"] == 1.0 and rows[0.5]["ceiling_tokens_per_call"] == float("inf")


def test_parallel_ceiling_runs_end_to_end_on_a_random_model(capsys):
  sys.path.insert(0, str(REPO / "bench"))
  import parallel_ceiling  # pylint: disable=import-outside-toplevel
  assert parallel_ceiling.main(["--config", str(REPO / "configs" / "ar_tiny.py"), "--random_weights",
                                "--sequences", "2", "--pairs", "2", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["positions"] == 2 * 127 and report["pairs"]["count"] == 2
  ceilings = [row["ceiling_tokens_per_call"] for row in report["thresholds"]]
  assert ceilings == sorted(ceilings) and ceilings[0] >= 1.0
  assert report["pairs"]["mean_excess_nats"] >= 0.0


def test_oracle_parallel_factor_pays_the_cheapest_pairs_for_the_parallel_share():
  sys.path.insert(0, str(REPO / "bench"))
  import parallel_ceiling  # pylint: disable=import-outside-toplevel
  costs = [4.0, 0.0, 1.0, 3.0]
  assert parallel_ceiling.oracle_parallel_factor(costs, 1.0) == 1.0  # one token per call: nothing in parallel
  # 2 tokens per call: half the tokens ride beside another, at the two cheapest costs (0 and 1, mean 0.5)
  np.testing.assert_allclose(parallel_ceiling.oracle_parallel_factor(costs, 2.0), np.exp(0.5 * 0.5), rtol=1e-12)
  np.testing.assert_allclose(parallel_ceiling.oracle_parallel_factor(costs, 4.0), np.exp(0.75 * 4.0 / 3), rtol=1e-12)


def test_parallel_ceiling_refuses_a_model_that_is_not_autoregressive(capsys):
  sys.path.insert(0, str(REPO / "bench"))
  import parallel_ceiling  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit) as exit_info:
    parallel_ceiling.main(["--config", str(REPO / "configs" / "block_tiny.py"), "--random_weights"])
  assert exit_info.value.code == 2
  assert "objective.name is 'block'" in capsys.readouterr().err


def test_pair_positions_keep_their_context_and_pair_inside_one_segment():
  sys.path.insert(0, str(REPO / "bench"))
  import parallel_ceiling  # pylint: disable=import-outside-toplevel
  # t=2 and 3: the pair reaches segment 2; t=4 and 5: the context starts in segment 1; t=7: the pair reaches padding
  segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
  picked = parallel_ceiling.pair_positions(segments, count=100, seed=0, min_context=2)
  assert sorted(picked) == [(0, 6)]  # segment 2 from index 4: context 4..5, pair 7, 8


def test_stream_rows_reports_first_batch_and_input_against_the_local_copy(s3_endpoint, capsys):
  """bench/stream_rows.py on the session's S3 server: a streamed copy leaves no token shard on disk, and each ratio
  is the ratio of the figures it reports."""
  sys.path.insert(0, str(REPO / "bench"))
  import stream_rows  # pylint: disable=import-outside-toplevel
  assert stream_rows.main(["--url", "s3://runs/bench-stream", "--size_mb", "2", "--seconds", "0.2", "--workers", "0",
                           "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["train_bytes"] == 2 << 20 and report["store"] == "s3://runs/bench-stream"
  copy, stream = report["first_batch"]["copy"], report["first_batch"]["stream"]
  assert copy["local_bytes"] > report["train_bytes"] > 100 * stream["local_bytes"]
  assert report["first_batch"]["copy_vs_stream"] == pytest.approx(copy["seconds"] / stream["seconds"], abs=0.01)
  (row,) = report["input"]
  assert row["num_workers"] == 0 and row["stream_tokens_per_s"] > 0
  assert row["stream_vs_local"] == pytest.approx(row["stream_tokens_per_s"] / row["local_tokens_per_s"], abs=1e-3)
  sequential = report["sequential"]  # 32 rows of 2048 tokens in 8 MB shards: one range, two across a shard end
  assert sequential["requests_per_batch"]["per_row"] >= 32 and 1 <= sequential["requests_per_batch"]["merged"] <= 2
  assert sequential["merged_vs_per_row"] == pytest.approx(
      sequential["merged_tokens_per_s"] / sequential["per_row_tokens_per_s"], abs=0.01)


def test_bucket_build_compares_one_process_with_two_building_together(s3_endpoint, capsys):
  """bench/bucket_build.py on the session's S3 server, a 2 MB corpus: the two processes' shards add up to the one
  process's (each keeps its own share), and the ratio is the ratio of the times it reports."""
  sys.path.insert(0, str(REPO / "bench"))
  import bucket_build  # pylint: disable=import-outside-toplevel
  assert bucket_build.main(["--url", "s3://runs/bench-bucket-build", "--size_mb", "2", "--skip_current",
                            "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  build = report["build"]
  one, two = build["shard_bytes"]["one_process"], build["shard_bytes"]["two_processes"]
  assert len(two) == 2 and sum(two) == one and min(two) > 0 and report["current"] is None
  assert build["two_vs_one"] == pytest.approx(build["two_processes"] / build["one_process"], abs=0.01)


def test_bucket_reads_fetch_a_jsonl_corpus_once_against_the_buffered_files(s3_endpoint, capsys):
  """bench/bucket_reads.py on the session's S3 server, a 2 MB corpus: the ranged reads fetch the JSONL bytes exactly
  once and the Parquet bytes about once, the buffered files more, both ways the same documents; each ratio is the
  ratio of the figures it reports."""
  sys.path.insert(0, str(REPO / "bench"))
  import bucket_reads  # pylint: disable=import-outside-toplevel
  assert bucket_reads.main(["--url", "s3://runs/bench-reads", "--size_mb", "2", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  rows = {row["kind"]: row for row in report["rows"]}
  assert sorted(rows) == ["jsonl", "parquet"]
  for kind, row in rows.items():
    ranged, buffered = row["ranged"], row["buffered"]
    assert row["spans"] >= 2 and ranged["documents"] == buffered["documents"] > 0, row
    assert buffered["x_size"] > ranged["x_size"], row
    assert row["time_ratio"] == pytest.approx(ranged["seconds"] / buffered["seconds"], abs=0.01)
  assert rows["jsonl"]["ranged"]["x_size"] == 1.0 and rows["jsonl"]["ranged"]["requests"] == rows["jsonl"]["spans"]


def test_eval_set_build_reads_once_and_matches_the_scanned_build(s3_endpoint, capsys):
  """bench/eval_set_build.py on the session's S3 server, a 2 MB set, one round: both builds give the same tokens
  (checked in the script) from local files and from the bucket; each ratio is the ratio of the times it reports."""
  sys.path.insert(0, str(REPO / "bench"))
  import eval_set_build  # pylint: disable=import-outside-toplevel
  assert eval_set_build.main(["--url", "s3://runs/bench-eval-set", "--size_mb", "2", "--rounds", "1", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert [row["files"] for row in report["rows"]] == ["local", "bucket"]
  for row in report["rows"]:
    assert row["tokens"] > 0 and row["ratio"] == pytest.approx(row["one_read_s"] / row["scanned_s"], abs=0.01)


def test_plan_reads_fetch_the_corpus_once_a_job_and_find_the_same_lines(s3_endpoint, capsys):
  """bench/plan_reads.py on the session's S3 server, a 3 MB corpus: both plans' spans start at line starts with
  their line numbers, from local files and from the bucket (checked in the script); the parts fetch the corpus once,
  process 0 of 4 about a quarter of it; a build given its tokenizer fetches the corpus twice, not three times; the
  ratios are those of the figures reported."""
  sys.path.insert(0, str(REPO / "bench"))
  import plan_reads  # pylint: disable=import-outside-toplevel
  assert plan_reads.main(["--url", "s3://runs/bench-plan", "--size_mb", "3", "--workers", "2", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert sorted(report["rows"]) == ["bucket", "local files"]
  for where, row in report["rows"].items():
    assert row["parts"] >= 3 and row["tasks"] == row["parts"], where
    assert row["job_time_ratio"] == pytest.approx(
        row["now_process_0"]["seconds_in_workers"] / max(row["before_per_process"]["seconds"], 1e-3), abs=0.01)
  row = report["rows"]["bucket"]
  before, now = row["before_per_process"], row["now_in_process"]
  assert now["fetched_mb"] == pytest.approx(before["fetched_mb"], rel=0.01)
  assert row["now_process_0"]["fetched_mb"] < 0.5 * now["fetched_mb"]
  assert row["job_fetched_ratio"] == pytest.approx(now["fetched_mb"] / (4 * before["fetched_mb"]), abs=0.01)
  assert report["rows"]["local files"]["job_fetched_ratio"] is None
  assert row["line_starts_in_process"]["fetched_mb"] < 0.2 * now["fetched_mb"]  # a line a part, not its chunk
  # the two builds (the same dataset, checked in the script): the line-start plan fetches the corpus twice in all
  # (scan, tokenise), the counting plan three times; a few kB more for the line starts
  builds = report["builds"]
  before, now = builds["counting plan (before)"], builds["line-start plan (now)"]
  assert before["fetched_mb"] == pytest.approx(3 * row["now_in_process"]["fetched_mb"], rel=0.02)
  assert 2 * row["now_in_process"]["fetched_mb"] <= now["fetched_mb"] < 0.75 * before["fetched_mb"]
  assert builds["fetched_ratio"] == pytest.approx(now["fetched_mb"] / before["fetched_mb"], abs=0.01)


def test_sample_floor_builds_the_same_tokenizer_from_fewer_merged_lines(capsys):
  """bench/sample_floor.py on 2 MB, one worker: both builds make the same tokenizer and dataset (checked in the
  script), the floor's process merges fewer candidate lines, and the ratios are the figures'."""
  sys.path.insert(0, str(REPO / "bench"))
  import sample_floor  # pylint: disable=import-outside-toplevel
  assert sample_floor.main(["--size_mb", "2", "--rounds", "1", "--sample_lines", "3000", "--vocab_size", "400",
                            "--workers", "1", "--json"]) == 0
  (runs,) = json.loads(capsys.readouterr().out)["rounds"]
  assert runs["now"]["merged_lines"] < runs["before"]["merged_lines"]
  assert runs["merged_lines_ratio"] == pytest.approx(runs["now"]["merged_lines"] / runs["before"]["merged_lines"],
                                                     abs=1e-4)


def test_prompts_memory_runs_both_jobs_over_the_same_requests(capsys):
  """bench/prompts_memory.py, 600 prompts: both jobs run every request with the same prompt tokens (checked in the
  script); spooled, the prompts take less memory than held as objects; the ratio is the figures'."""
  sys.path.insert(0, str(REPO / "bench"))
  import prompts_memory  # pylint: disable=import-outside-toplevel
  assert prompts_memory.main(["--prompts", "600", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  before, now = report["before"], report["now"]
  assert now["requests"] == before["requests"] == 600 and now["peak_mb"] < before["peak_mb"] / 2
  assert report["peak_ratio"] == pytest.approx(now["peak_mb"] / before["peak_mb"], abs=0.01)


def test_results_memory_runs_both_jobs_to_the_same_file(capsys):
  """bench/results_memory.py, 300 results: both jobs write the same file (checked in the script); held as lines,
  the results take less memory than held as objects three times over (allocations, not time); each ratio is the
  ratio of the figures reported."""
  sys.path.insert(0, str(REPO / "bench"))
  import results_memory  # pylint: disable=import-outside-toplevel
  assert results_memory.main(["--results", "300", "--new_tokens", "64", "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  before, now = report["before"], report["now"]
  assert now["file_mb"] == before["file_mb"] and now["peak_mb"] < before["peak_mb"]
  assert report["peak_ratio"] == pytest.approx(now["peak_mb"] / before["peak_mb"], abs=0.01)
