"""A run that lives in a Google Cloud Storage bucket: workdir, data.source and data.dir all `gs://` URLs on a local
GCS server (conftest's `gcs_endpoint`). Orbax writes and reads the checkpoint arrays through tensorstore's `gcs`
driver, everything else (metrics, the pinned tokenizer, the dataset, commit markers) goes through gcsfs. The oracle
is conftest's `trained_run`, the same run trained uninterrupted on local disk. The S3 run, which checks other
things (the profile upload, the run history, the cache folder per URL), is in test_object_storage.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TRAINED_OVERRIDES, TRAINED_STEPS, read_metrics, train_losses, upload_files

# The resumed run and the evaluation read the programs the first run compiled from JAX's cache.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _bound_at(records: list[dict], step: int) -> float:
  return [r["eval/bits_per_token"] for r in records if r.get("step") == step and "eval/bits_per_token" in r][-1]


def test_a_run_in_a_gcs_bucket_resumes_exactly_and_is_read_back(gcs_endpoint, trained_run, load_tiny,
                                                                 tiny_config_file, tmp_path, capsys):
  """Stopped at its first checkpoint and resumed: every step's loss, the held-out bound and the parameters of the
  last checkpoint are the uninterrupted local run's, so the dataset built from the bucket's corpus holds the same
  rows; diffgemma-eval, from a fresh dataset cache, gives that bound and writes it to the bucket. (The first run
  skips its held-out evaluation, which leaves the training steps as they were: one compilation less.)"""
  import orbax.checkpoint as ocp
  from etils import epath

  from diffgemma_jax.train import train
  from launch.evaluate import main as eval_main
  _, reference_dir, _ = trained_run
  upload_files(str(load_tiny().data.source), "gs://runs/corpus")
  workdir, stop, resume = "gs://runs/run", 8, 16
  # schedule_steps keeps the reference's learning-rate schedule (over its 24 steps) while num_steps stops earlier
  bucket_data = {"data.source": "gs://runs/corpus", "data.dir": "gs://runs/data",
                 "train.schedule_steps": str(TRAINED_STEPS)}
  overrides = dict(TRAINED_OVERRIDES, **bucket_data, **{"data.cache_dir": str(tmp_path / "cache")})
  first = train(load_tiny(dict(overrides, **{"train.num_steps": str(stop), "eval.every_steps": "0"})), workdir,
                show_progress=False)
  checkpoints = epath.Path(workdir, "checkpoints")
  assert first["final_step"] == stop and [p.name for p in checkpoints.iterdir() if p.name.isdigit()] == [str(stop)]
  assert (checkpoints / str(stop) / "commit_success.txt").is_file()  # committed by a marker: no rename in a bucket
  resumed = train(load_tiny(dict(overrides, **{"train.num_steps": str(resume)})), workdir, show_progress=False)
  assert (resumed["start_step"], resumed["final_step"]) == (stop, resume)

  local_metrics = "metrics.jsonl"
  (tmp_path / local_metrics).write_bytes(epath.Path(workdir, local_metrics).read_bytes())
  losses, reference = train_losses(str(tmp_path)), train_losses(reference_dir)
  assert sorted(losses) == list(range(1, resume + 1)) and all(len(v) == 1 for v in losses.values())
  for step in range(1, resume + 1):
    assert losses[step][0] == pytest.approx(reference[step][0], rel=1e-6, abs=0), step
  reference_bound = _bound_at(read_metrics(reference_dir), resume)
  assert _bound_at(read_metrics(str(tmp_path)), resume) == pytest.approx(reference_bound, rel=1e-6)
  saved = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/{resume}/params")
  expected = ocp.StandardCheckpointer().restore(f"{reference_dir}/checkpoints/{resume}/params")
  for (path, got), (_, want) in zip(*(sorted(_flat(tree).items()) for tree in (saved, expected)), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=path)

  run = ["--config", tiny_config_file, "--workdir", workdir, *(f"--config.{k}={v}" for k, v in bucket_data.items()),
         f"--config.data.cache_dir={tmp_path / 'fresh-cache'}", f"--config.train.num_steps={resume}"]
  assert eval_main(run + ["--output", "gs://runs/out/bound.json"]) == 0, capsys.readouterr().err
  printed = json.loads(capsys.readouterr().out)
  assert printed["step"] == resume and printed["bits_per_token"] == pytest.approx(reference_bound, rel=1e-6)
  assert json.loads(epath.Path("gs://runs/out/bound.json").read_text()) == printed


def _flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}/{key}").items()}
  return {prefix: np.asarray(tree)}
