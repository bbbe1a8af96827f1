"""Entry points: overrides, one-line errors with exit 2 (nothing written), and the console scripts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import reader_clis
from launch.train import main as train_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_reach_the_config(load_tiny):
  config = load_tiny({"train.num_steps": "7", "train.learning_rate": "1e-4", "data.recipe": "shakespeare",
                      "data.source": "", "model.layer_pattern": "('global',)"})
  assert config.train.num_steps == 7 and config.train.learning_rate == 1e-4
  assert config.data.recipe == "shakespeare" and config.model.layer_pattern == ("global",)
  assert [load_tiny({"init.step": v}).init.step for v in ("best", " latest", "12", "-1")] == ["best", "latest", 12, -1]


@pytest.mark.parametrize("flag, expected", [
    ("--config.train.num_stepz=3", "unknown config key 'train.num_stepz'; valid keys there are: train.adam_mu_dtype, train.b1, train.b2,"),
    ("--config.optimizer.lr=3", "valid keys there are: checkpoint, compilation, data, distributed, eval, init, log, mesh, model, objective, train"),
    ("--config.train.seq_len=0", "train.seq_len: must be a positive integer"),
    ("--config.train.batch_size=oops", "config key 'train.batch_size': cannot parse 'oops' as an integer (like its "
     "current value 4): not a Python literal"),
    ("--config.train.freeze=router", "write a Python tuple, strings quoted: ('a', 'b')"),
    ("--config.model.top_k=99", "model.top_k"),
    ("--config.mesh.shape=(2,1,1,1)", "mesh.shape"),
    ("--bogus", "unrecognised argument '--bogus'"),
    ("--config.objective.name=block --config.train.seq_len=40", "does not divide train.seq_len=40"),
    ("--config.train.num_steps=1.5", "config key 'train.num_steps': expected an integer"),
    ("--config.train.learning_rate='abc'", "config key 'train.learning_rate': expected a number"),
    ("--config.model=3", "config key 'model' is a section, not a value"),
    ("--config.train.learning_rate=-0.05", "train.learning_rate: must be a finite number > 0"),
    ("--config.train.learning_rate=1e39", "train.learning_rate: must be a finite number > 0"),
    ("--config.train.b2=1.0", "train.b2: must be in [0, 1)"),
    ("--config.train.adam_mu_dtype=float16", "train.adam_mu_dtype: 'float16' is no choice; valid are"),
    ("--config.train.frozen_dtype=float16", "train.frozen_dtype: 'float16' is no choice; valid are"),
    ("--config.train.frozen_dtype=bfloat16", "train.frozen_dtype='bfloat16' sets the frozen parameters' dtype, "
     "but this run freezes none"),
    ("--config.train.adam_mu_dtype=bfloat16 --config.train.optimizer=adafactor",
     "train.adam_mu_dtype='bfloat16' sets AdamW's first moment, but train.optimizer='adafactor' keeps none"),
    ("--config.eval.batch_size=0", "eval.batch_size: must be >= 1"),
    ("--config.init.step=newest", "config key 'init.step': give a checkpoint step (a number >= 0), 'latest' (or -1) "
     "or 'best'"),
    ("--config.eval.max_sequences=-1", "eval.max_sequences: must be >= 0 (0: the whole held-out split)"),
    ("--config.data.dir=s3:/runs/data", "error: data.dir 's3:/runs/data' is a bucket URL with a slash missing"),
    ("--config.data.source=corpus,gs:bucket/more", "data.source 'gs:bucket/more' is a bucket URL with a slash missing "
     "(it would be a local folder named 'gs:'); write gs://bucket/path, or ./gs:bucket/more for such a local folder"),
    ("--config.data.recipe=python_stdlib", "is set, but data.recipe='python_stdlib' reads none (it would be "
     "ignored); clear it, or use a recipe that reads it: ('text_files', 'jsonl', 'python_packages')"),
    ("--config.data.recipe=python_packages --config.data.heldout_source=val.txt", "data.heldout_source='val.txt' is "
     "set, but data.recipe='python_packages' reads none"),
    ("--config.data.recipe=python_packages --config.data.text_field=content", "data.text_field='content' is set, but "
     "data.recipe='python_packages' reads none (it would be ignored); leave it 'text', or use a recipe that reads "
     "it: ('text_files',)"),
    ("--config.objective.block_size=32", "objective.block_size=32 is set, but objective.name='masked' reads no such "
     "setting (it would be ignored); leave it 16, or use an objective that reads it: ('block', 'uniform')"),
    ("--config.objective.name=ar --config.objective.eps=0.01", "objective.eps=0.01 is set, but objective.name='ar' "
     "reads no such setting"),
    ("--config.eval.heldout_sets=val.jsonl", "eval.heldout_sets: 'val.jsonl' is not NAME=FILES (a name of letters, "
     "digits, '_', '-' or '.', then data.source's forms); separate sets with ';'"),
    ("--config.eval.heldout_sets=a=x.txt;a=y.txt", "eval.heldout_sets: the name 'a' is given twice"),
    ("--config.eval.heldout_sets=a=s3:/b/val", "eval.heldout_sets 's3:/b/val' is a bucket URL with a slash missing"),
    ("--config.eval.heldout_sets=wiki=/no/such/valid.jsonl", "eval.heldout_sets (wiki) '/no/such/valid.jsonl' does "
     "not exist"),
    ("--config.data.tokenizer_sample_lines=5000 --config.data.tokenizer=any.model", "data.tokenizer_sample_lines=5000 "
     "is set, but no tokenizer is trained (data.tokenizer is given; it would be ignored); leave it 120000, or clear "
     "data.tokenizer to train one"),
    ("--config.data.sft_packing=True", "data.sft_packing=True packs SFT examples, but data.recipe='text_files' is a "
     "pretraining recipe, whose rows are packed anyway (it would be ignored); leave it False, or use an SFT recipe: "
     "('python_docstrings', 'jsonl')"),
])
def test_bad_input_exits_2_with_one_line(flag, expected, tiny_config_file, tmp_path, capsys):
  workdir = tmp_path / "run"
  assert train_main(["--config", tiny_config_file, "--workdir", str(workdir)] + flag.split()) == 2
  err = capsys.readouterr().err
  assert expected in err and err.count("\n") == 1 and err.startswith("error: "), err
  assert not workdir.exists()  # nothing written


def test_config_argument_and_file_paths_fail_with_one_line(tiny_config_file, tmp_path, capsys):
  afile = tmp_path / "afile"
  afile.write_text("not a checkpoint")
  broken = {"syntax.py": "def get_config(:\n  pass\n", "imports.py": "\n\nimport no_such_module_here\n",
            "raises.py": "def get_config():\n  return 1 / 0\n", "dict.py": "def get_config():\n  return {}\n"}
  for name, text in broken.items():
    (tmp_path / name).write_text(text)
  for name, expected in (("syntax.py", "cannot be loaded: line 1: SyntaxError: invalid syntax"),
                         ("imports.py", "cannot be loaded: line 3: ModuleNotFoundError: No module named "
                          "'no_such_module_here'"),
                         ("raises.py", "get_config() failed: line 2: ZeroDivisionError: division by zero"),
                         ("dict.py", "get_config() returned dict, not a ConfigDict"),
                         ("afile", "is not a Python file: give a .py file that defines get_config()")):
    assert train_main(["--config", str(tmp_path / name), "--workdir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and err.startswith("error: config file "), err
  for argv, expected in ((["--config", tiny_config_file + ":foo", "--workdir", str(tmp_path / "a")], "takes no argument"),
                         (["--config", tiny_config_file, "--workdir", str(tmp_path / "b"),
                           f"--config.init.checkpoint={afile}"], "init.checkpoint: " + str(afile) + " is not a directory"),
                         (["--config", tiny_config_file, "--workdir", str(afile)], "is a file, not a directory"),
                         (["--config", tiny_config_file, "--workdir", "s3:/runs/x"],
                          "--workdir 's3:/runs/x' is a bucket URL with a slash missing"),
                         (["--config", tiny_config_file, "--workdir", str(afile / "run")],
                          f"--workdir {afile / 'run'} cannot be created: a file is in the way ({afile}); "
                          f"give a folder this user can write"),
                         (["--config", tiny_config_file, "--workdir", str(tmp_path / "d"),
                           f"--config.data.dir={afile / 'data'}"], f"data.dir {afile / 'data'} cannot be created: a "
                          f"file is in the way ({afile})"),
                         (["--config", tiny_config_file, "--workdir", str(tmp_path / "c"),
                           f"--config.data.tokenizer={afile}"], "is not a sentencepiece model")):
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and err.startswith("error: "), err


def test_readers_refuse_a_workdir_that_is_a_file_or_missing(tiny_config_file, tmp_path, capsys):
  afile = tmp_path / "afile"
  afile.write_text("not a run")
  for main, extra in reader_clis(tmp_path):
    for workdir, expected in ((afile, f"--workdir {afile} is a file, not a directory"),
                              (tmp_path / "nowhere", f"--workdir {tmp_path / 'nowhere'} does not exist")):
      assert main(["--config", tiny_config_file, "--workdir", str(workdir)] + extra) == 2, main.__module__
      err = capsys.readouterr().err
      assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (main.__module__, err)
  assert not (tmp_path / "hf").exists()


def test_incompatible_workdir_exits_2(trained_run, tiny_config_file, tmp_path, capsys):
  _, reference_dir, _ = trained_run
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_dir, workdir)
  assert train_main(["--config", tiny_config_file, "--workdir", workdir, "--config.model.mlp_dim=64"]) == 2
  err = capsys.readouterr().err
  assert "model.mlp_dim: 128 in the checkpoints, 64 in the config" in err


def test_python_m_launch_train_fails_cleanly_without_traceback(tiny_config_file, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", tiny_config_file, "--workdir",
                         str(tmp_path / "w"), "--config.eval.every_stepz=1"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr and "eval.every_steps" in proc.stderr


def test_console_scripts_installed():
  bindir = os.path.dirname(sys.executable)
  for name in ("diffgemma-train", "diffgemma-eval"):
    assert shutil.which(name, path=bindir), f"{name} missing: pip install -e . registers it"
