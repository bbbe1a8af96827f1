"""The trainer's side of the data: build (or reuse) the recipe's dataset, check its tokenizer against the model,
open the checkpointable train iterator, and the fixed-shape held-out batches."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import sentencepiece as spm
from etils import epath

from data_recipes import SFT_RECIPES, build_dataset
from data_recipes.text_files import source_files
from diffgemma_jax import storage
from diffgemma_jax.data import remote_dataset
from diffgemma_jax.data import EvalBatches, Tokenizer, make_eval_batches, make_train_iterator, unigram_ppl
from diffgemma_jax.data.build_status import JobBuild, KeyValueBoard
from diffgemma_jax.data.manifest import read_manifest
from diffgemma_jax.data.mixture import check_mixture, parse_heldout_sets, parse_mixture, weighted_unigram_ppl
from diffgemma_jax.data.tokenizer import same_tokenizer
from diffgemma_jax.errors import ConfigError
from diffgemma_jax.objectives import OBJECTIVES
from diffgemma_jax.parallel.distributed import barrier, runtime_client, shared_token
from diffgemma_jax.train.reading import open_init_checkpoint, pinned_tokenizer


def dataset_dir(config) -> str:
  """`data.dir`, or `data/<recipe>-v<vocab_size>`: configs with different vocabularies never rebuild (and so
  invalidate) each other's tokenizer."""
  return config.data.dir or os.path.join("data", f"{config.data.recipe}-v{int(config.model.vocab_size)}")


def checked_data_tokenizer(path: str) -> str:
  """`path`, the value of `data.tokenizer`, once it is known to be a sentencepiece model file; else a
  ConfigError naming the key."""
  if storage.is_url(path):
    storage.check_reachable(path, "data.tokenizer")
  if not epath.Path(path).is_file():
    raise ConfigError(f"data.tokenizer: {path!r} does not exist; give a sentencepiece .model")
  path = storage.local_file(path)
  try:
    spm.SentencePieceProcessor(model_file=path)
  except (RuntimeError, OSError) as e:
    raise ConfigError(f"data.tokenizer: {path!r} is not a sentencepiece model ({str(e).splitlines()[0][:200]}); "
                      f"give a sentencepiece .model file") from None
  return path


def tokenizer_source(config, run_dir: str | None = None) -> str | None:
  """The sentencepiece file a dataset is built with: `data.tokenizer`; for SFT recipes without it, the tokenizer
  the run in `run_dir` pinned (a trained or resumed fine-tune: its own workdir is enough), else the tokenizer of
  init.checkpoint's run (fine-tuning must read tokens with the ids the model was trained on); else None (the
  recipe trains its own)."""
  if config.data.tokenizer:
    return checked_data_tokenizer(str(config.data.tokenizer))  # before a dataset folder is started with it
  if config.data.recipe not in SFT_RECIPES:
    return None
  pinned = pinned_tokenizer(run_dir) if run_dir else None
  if pinned:
    return pinned
  if config.init.checkpoint:
    init_run = open_init_checkpoint(config).run_dir
    pinned = pinned_tokenizer(init_run)
    if not pinned:
      raise ConfigError(f"init.checkpoint's run {init_run} keeps no tokenizer.model; set data.tokenizer to the "
                        f"tokenizer it was trained with")
    return pinned
  return None


def mixture_entries(config, *, local: bool = True) -> list[tuple[str, float]]:
  """data.mixture's [(directory, weight)], or [] for one dataset; a dataset in a bucket as its local copy (as
  written, with local=False)."""
  entries = parse_mixture(str(config.data.mixture)) if config.data.mixture else []
  if local and any(storage.is_url(d) for d, _ in entries):
    for directory, _ in entries:
      storage.check_reachable(directory, "data.mixture:")
    cache = _cache_root(config)
    entries = [(remote_dataset.fetch(d, cache, key="data.mixture", max_bytes=_cache_max_bytes(config),
                                     stream=bool(config.data.stream_tokens))
                if storage.is_url(d) else d, w) for d, w in entries]
  return entries


EVAL_SETS = "eval-sets"  # the dataset cache's folder of evaluation sets (`eval_set_dir`)


def _cache_root(config) -> str:
  return str(config.data.cache_dir) or remote_dataset.default_cache_root()


def _cache_max_bytes(config) -> int:
  return int(float(config.data.cache_max_gb) * 2**30)


def prepare_dataset(config, run_dir: str | None = None) -> tuple[str, Any]:
  """Builds the dataset of `data.recipe` if missing (idempotent) and returns (directory, tokenizer); with
  data.mixture, checks its built datasets and returns the first one's (they share the tokenizer). `run_dir`: the
  workdir of the run being trained or read (its pinned tokenizer builds an SFT dataset, see `tokenizer_source`).

  The tokenizer must have exactly `model.vocab_size` entries: the embedding table is indexed by its ids.
  """
  mixture = mixture_entries(config)
  if mixture:
    check_mixture(mixture)
    directory = mixture[0][0]
  else:
    directory = dataset_dir(config)
    options = dict(source=config.data.source or None, tokenizer=tokenizer_source(config, run_dir),
                   heldout_source=config.data.heldout_source or None, max_bad_lines=int(config.data.max_bad_lines),
                   text_field=str(config.data.text_field), build_workers=int(config.data.build_workers),
                   tokenizer_sample_lines=int(config.data.tokenizer_sample_lines))
    build = functools.partial(build_dataset, config.data.recipe, vocab_size=int(config.model.vocab_size))
    if storage.is_url(directory):
      directory = _dataset_in_bucket(config, directory, lambda local, **job: build(local, **options, **job))
    else:
      storage.check_local_folder(directory, "data.dir")
      if jax.process_count() > 1:  # every process builds its share of the files (a shared filesystem)
        options.update(process_index=jax.process_index(), process_count=jax.process_count(), barrier=barrier,
                       every_process=bool(config.data.build_on_every_process),
                       job=_local_build_job(directory))
      build(directory, **options)
  tokenizer = Tokenizer(os.path.join(directory, "tokenizer.model"))
  if tokenizer.mask_id < 0 and OBJECTIVES[config.objective.name].capabilities.mask_token:
    raise ConfigError(f"objective.name={config.objective.name!r} corrupts tokens to <mask>, which the tokenizer in "
                      f"{directory} lacks; use a tokenizer with a <mask> piece or objective.name='uniform'")
  if tokenizer.vocab_size != int(config.model.vocab_size):
    raise ConfigError(f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but model.vocab_size="
                      f"{config.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size} or point data.dir "
                      f"at a dataset built for {config.model.vocab_size}")
  return directory, tokenizer


# process 0's reports on a local or bucket build (data/build_status.py), in the job's own key-value store
LOCAL_BUILD_STATUS_KEY = "diffgemma_dataset_build_status"
BUCKET_BUILD_STATUS_KEY = "diffgemma_bucket_dataset_build_status"


def _local_build_job(directory: str) -> JobBuild | None:
  """The multi-process local build of `directory` as a reported job (process 0 may wait hours for another job's
  build lock; its processes wait while it beats); None where the runtime's client cannot be reached (plain
  barriers then)."""
  client = runtime_client()
  if client is None:
    return None
  return JobBuild(KeyValueBoard(client, LOCAL_BUILD_STATUS_KEY), process_index=jax.process_index(), barrier=barrier,
                  what=f"data.dir {directory}", start="diffgemma_dataset_start")


def _dataset_in_bucket(config, url: str, build) -> str:
  """The local copy (data/remote_dataset.py) of the dataset in the bucket folder `url`, built there first when
  missing or stale: a pretraining recipe's by every process, each building its share of the corpus on its own
  disk and uploading its shards; an SFT recipe's (small) by process 0 alone while the others wait and then fetch
  it."""
  storage.check_reachable(url, "data.dir")
  cache, stream = _cache_root(config), bool(config.data.stream_tokens)
  storage.check_local_folder(cache, "data.cache_dir")
  if jax.process_count() == 1:
    return remote_dataset.build_in_bucket(url, cache, build, max_bytes=_cache_max_bytes(config), stream=stream)
  client = runtime_client()  # the job's own key-value store: jobs building the same folder never read each other
  board = KeyValueBoard(client, f"{BUCKET_BUILD_STATUS_KEY}:{url}") if client is not None else None
  # every process builds its share (remote_dataset.build_shared), unless the sources are process 0's alone
  together = config.data.recipe not in SFT_RECIPES and bool(config.data.build_on_every_process)
  return remote_dataset.build_shared(
      url, cache, build, process_index=jax.process_index(), barrier=barrier, max_bytes=_cache_max_bytes(config),
      board=board, stream=stream, process_count=jax.process_count(),
      build_id=shared_token(f"diffgemma_bucket_build_id:{url}") if together else "")


def load_tokenizer(config, workdir: str | None = None) -> Tokenizer:
  """The tokenizer a reader of a run uses: the run's own (pinned in its workdir by the trainer), else
  `data.tokenizer` (e.g. the tokenizer of imported weights), else the dataset's."""
  pinned = pinned_tokenizer(workdir) if workdir else None
  if pinned:
    return Tokenizer(pinned)
  if config.data.tokenizer:
    return Tokenizer(checked_data_tokenizer(str(config.data.tokenizer)))
  return Tokenizer(os.path.join(dataset_dir(config), "tokenizer.model"))


def pin_tokenizer(directory: str, workdir: str, *, write: bool) -> None:
  """Keeps the tokenizer a run was trained with in its workdir, and refuses a dataset whose tokenizer differs
  (a rebuilt dataset would otherwise silently re-map every token id of the trained model)."""
  source = os.path.join(directory, "tokenizer.model")
  pinned = os.path.join(workdir, "tokenizer.model")
  if epath.Path(pinned).is_file():
    if not same_tokenizer(source, storage.local_file(pinned)):  # by content: a file records its build path
      raise ConfigError(f"the tokenizer in {directory} differs from {pinned}, the one this run was trained with; "
                        f"point data.dir at the run's original dataset or use a new --workdir")
  elif write:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if storage.is_url(pinned):  # an object is written whole or not at all
      epath.Path(source).copy(pinned)
    else:
      shutil.copyfile(source, pinned + ".tmp")
      os.replace(pinned + ".tmp", pinned)


def train_iterator(config, directory: str, *, process_index: int = 0, process_count: int = 1):
  mixture = mixture_entries(config)
  return make_train_iterator([d for d, _ in mixture] or directory, weights=[w for _, w in mixture] or None,
                             seq_len=int(config.train.seq_len),
                             batch_size=int(config.train.batch_size) // process_count, seed=int(config.data.seed),
                             process_index=process_index, process_count=process_count,
                             num_workers=int(config.data.num_workers), template=str(config.data.chat_template),
                             sft_pack_unit=sft_pack_unit(config))


def sft_pack_unit(config) -> int:
  """`data.sft_packing`'s unit for SFT rows (data/sft/rows.py): responses end on whole canvases of
  objective.block_size for the objectives that cut rows into canvases, on their EOS otherwise; 0: no packing."""
  if not bool(config.data.sft_packing):
    return 0
  canvases = OBJECTIVES[str(config.objective.name)].capabilities.canvases
  return int(config.objective.block_size) if canvases else 1


def eval_batches(config, directory: str, *, process_index: int = 0, process_count: int = 1) -> EvalBatches:
  """The held-out split as fixed-shape batches of `eval.batch_size` rows, in order (deterministic and unshuffled),
  read as they are used; slice `process_index` of `process_count` of each (`parallel.mesh.batch_slice`) where the
  processes of a mesh load their own rows."""
  return make_eval_batches(directory, seq_len=int(config.train.seq_len), batch_size=int(config.eval.batch_size),
                           max_sequences=int(config.eval.max_sequences), template=str(config.data.chat_template),
                           sft_pack_unit=sft_pack_unit(config), process_index=process_index,
                           process_count=process_count)


def eval_sets(config, directory: str, *, process_index: int = 0,
              process_count: int = 1) -> list[tuple[str, float, EvalBatches]]:
  """[(name, weight, held-out batches)]: one set, or one per dataset of data.mixture (`eval.max_sequences` each);
  each process's slice of them as in `eval_batches`."""
  mixture = mixture_entries(config) or [(directory, 1.0)]
  names = [d for d, _ in mixture_entries(config, local=False)] or [directory]  # a bucket dataset by its URL
  return [(name, w, eval_batches(config, d, process_index=process_index, process_count=process_count))
          for name, (d, w) in zip(names, mixture)]


def eval_set_dir(config, heldout: str, tokenizer: str) -> str:
  """Where `diffgemma-eval --heldout` and eval.heldout_sets build an evaluation set unless told: `<data.cache_dir>/
  eval-sets/<key>` (data.cache_dir's default: `$XDG_CACHE_HOME/diffgemma-jax/datasets`, `~/.cache/...` without it),
  the key a digest of the sources as given (local paths made absolute), the tokenizer's content and
  data.text_field; the build itself is redone when a file changes (text_files' stamps). In the dataset cache, so
  data.cache_max_gb counts the sets with the dataset copies, and evicts the least recently used of either."""
  parts = [p.strip() if storage.is_url(p.strip()) else os.path.abspath(p.strip()) for p in heldout.split(",")
           if p.strip()]
  key = hashlib.sha256(json.dumps([parts, storage.file_sha256(tokenizer), str(config.data.text_field)]).encode())
  return os.path.join(_cache_root(config), EVAL_SETS, key.hexdigest()[:16])


def run_tokenizer(config, run_dir: str, flag: str) -> str:
  """The sentencepiece file the run in `run_dir` reads (the one it pinned; data.tokenizer where it pinned none), for
  an evaluation set; a ConfigError naming `flag` when there is neither."""
  tokenizer = pinned_tokenizer(run_dir) or (checked_data_tokenizer(str(config.data.tokenizer))
                                            if config.data.tokenizer else None)
  if not tokenizer:
    raise ConfigError(f"{flag}: the run in {run_dir} keeps no tokenizer.model (imported weights?); set "
                      f"data.tokenizer to the sentencepiece model it reads")
  return tokenizer


def heldout_set(config, tokenizer: str, heldout: str, folder: str | None = None, text_field: str | None = None,
                key: str = "--heldout") -> tuple[str, Any]:
  """(directory, tokenizer) of the evaluation set of `heldout` (text_files' forms: files, folders, globs, bucket
  URLs; every document held out, none trained on), built with the sentencepiece file `tokenizer` (the model's) in
  the local folder `folder` (default `eval_set_dir`), or found current there; a record's text in `text_field`
  (default data.text_field). Errors about the files name `key`."""
  if text_field:
    config = config.copy_and_resolve_references()
    config.data.text_field = text_field
  if folder and storage.is_url(folder):
    raise ConfigError(f"--heldout_dir {folder}: give a local folder (the evaluation set is built on this host)")
  cached = not folder
  folder = folder or eval_set_dir(config, heldout, tokenizer)
  storage.check_local_folder(folder, "--heldout_dir" if key == "--heldout" else key)
  with storage.remembered_listings():  # a source in a bucket: listed once
    source_files(heldout, key)  # missing files named by the caller's key, before the build names its own
    build_dataset("text_files", folder, vocab_size=int(config.model.vocab_size), heldout_source=heldout,
                  tokenizer=tokenizer, text_field=str(config.data.text_field),
                  max_bad_lines=int(config.data.max_bad_lines), build_workers=int(config.data.build_workers))
  if cached:  # its last use (what the cache's eviction orders by), and the cache pruned to data.cache_max_gb
    remote_dataset.in_use(folder, _cache_root(config), _cache_max_bytes(config))
  return folder, Tokenizer(os.path.join(folder, "tokenizer.model"))


def unigram_on(config, eval_dir: str) -> float | None:
  """The unigram scale of an evaluation set (`heldout_set`): the run's training split's unigram model, where the
  config's one dataset is at hand on this host with the same tokenizer; else None."""
  train_dir = dataset_dir(config)
  if (mixture_entries(config) or storage.is_url(train_dir) or read_manifest(train_dir) is None
          or not same_tokenizer(os.path.join(train_dir, "tokenizer.model"), os.path.join(eval_dir, "tokenizer.model"))):
    return None
  return unigram_ppl(train_dir, seq_len=int(config.train.seq_len), template=str(config.data.chat_template),
                     sft_pack_unit=sft_pack_unit(config), heldout_dir=eval_dir)


def check_heldout_sets(config) -> None:
  """Fails naming eval.heldout_sets when a set's files are missing: a trainer asks before it builds or writes
  anything."""
  with storage.remembered_listings():
    for name, files in parse_heldout_sets(str(config.eval.heldout_sets)):
      source_files(files, f"eval.heldout_sets ({name})")


def heldout_set_batches(config, directory: str, *, process_index: int = 0, process_count: int = 1
                        ) -> list[tuple[str, EvalBatches, float | None]]:
  """The trainer's other held-out sets (eval.heldout_sets): [(name, its batches, its `unigram_on` scale)], each
  built with the tokenizer of the training dataset in `directory` (the run's: `pin_tokenizer` checked it), each
  process reading its slice as in `eval_batches`."""
  tokenizer = os.path.join(directory, "tokenizer.model")
  sets = []
  for name, files in parse_heldout_sets(str(config.eval.heldout_sets)):
    folder, _ = heldout_set(config, tokenizer, files, key=f"eval.heldout_sets ({name})")
    sets.append((name, eval_batches(config, folder, process_index=process_index, process_count=process_count),
                 unigram_on(config, folder)))
  return sets


def unigram_baseline(config, directory: str) -> float:
  """Held-out perplexity of a unigram model of the training split (same tokenizer): the scale for the bound; for
  a mixture, each dataset's on the weighted log scale of the bound."""
  mixture = mixture_entries(config) or [(directory, 1.0)]
  values = [(w, unigram_ppl(d, seq_len=int(config.train.seq_len), template=str(config.data.chat_template),
                            sft_pack_unit=sft_pack_unit(config)))
            for d, w in mixture]
  return float(values[0][1] if len(values) == 1 else weighted_unigram_ppl(values))
