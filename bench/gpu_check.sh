#!/usr/bin/env bash
# One command for the GPU checks: bench/gpu_check.sh [OUTDIR]   (OUTDIR defaults to $OUT, else ./gpu_check_out)
#
# Runs each step below with its own timeout and log (OUTDIR/<step>.log), keeps going when one fails, writes
# OUTDIR/summary.txt, and exits non-zero if any step failed. The timeouts add up to 8 minutes (480 s). The two
# Mosaic GPU test steps (40 + 35 s) came out of the sampler step (100 -> 60 s, its budget 70 -> 40 s), the attention
# benchmark (100 -> 70 s, budget 80 -> 55 s) and the Triton tests (50 -> 45, 40 -> 35 s); the 1B train step keeps
# its 150 s (budget 120 s): it is the measurement the GPU time is scarcest for.
# When OUTDIR is $OUT (the device machines, which return at most 8 files) the logs are packed into logs.tar.gz.
# Order: the attention kernels' tests on the compiled Triton kernels first (a wrong kernel makes its numbers
# meaningless), then the same on the compiled Mosaic GPU kernels (Hopper), then the attention benchmark
# (bench/attention_gpu.py: every implementation, Mosaic beside Triton with their ratio, DiffusionGemma's layer
# shapes, 8192 / 2048 / 32768 tokens until its time budget), then the 1B train step (bench/train_gpu.py: masked
# and block objectives with our attention and with xla's, the longest sequence that fits at batch 1, a profile of
# two steps, summarised in train_gpu.json; the trace stays in $PROFILE_DIR, default
# /tmp/gpu_check_profile), then the grouped-matmul tests (the Triton kernels, then the Mosaic GPU ones compiled:
# tests/test_pallas_mosaic_gmm.py), a trimmed grouped-matmul benchmark (Triton, Mosaic GPU and ragged_dot in one
# run, with the Mosaic/Triton ratio), and the samplers' throughput on the 1B config (random weights: the AR decoder
# and block_fused at batch 1 and 32).
# Each benchmark ends with its JSON when its own time budget runs out ("skipped" rows list what was left out).
# GPU_CHECK_ONLY=name,name runs a subset. To add a check, append "name|timeout_seconds|command" to STEPS.
# Dry run on a CPU: DIFFGEMMA_PALLAS_GPU=0 GPU_CHECK_ONLY=environment,attention_tests bench/gpu_check.sh /tmp/out
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$REPO/gpu_check_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$REPO"
: > "$OUTDIR/summary.txt"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

# Packages the GPU image lacks travel as wheels in .whl/ (bench/fetch_gpu_wheels.sh downloads them where pip
# works; carry .whl with the device call); the repo itself imports from the tree.
# A failed install (wheels for another Python, say) is logged and the checks go on: the kernel steps need none.
if [ -d .whl ]; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl > "$OUTDIR/wheels.log" 2>&1; then
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  else
    echo "wheels: install from .whl failed (see $OUTDIR/wheels.log); going on without them" | tee -a "$OUTDIR/summary.txt"
  fi
fi
export PYTHONPATH="$REPO:${PYTHONPATH:-}"

STEPS=(
  "environment|15|$PY -c 'import jax, jaxlib; print(jax.__version__, jaxlib.__version__, jax.devices())'; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true"
  "attention_tests|45|DIFFGEMMA_PALLAS_GPU=${DIFFGEMMA_PALLAS_GPU:-1} $PY -m pytest -q -p no:cacheprovider tests/test_flash_attention.py"
  "attention_mosaic_tests|40|DIFFGEMMA_PALLAS_GPU=${DIFFGEMMA_PALLAS_GPU:-1} $PY -m pytest -q -p no:cacheprovider tests/test_flash_attention_mosaic.py"
  "attention_benchmark|70|$PY bench/attention_gpu.py --json $OUTDIR/attention_gpu.json --time-budget-s 55 --runs 5 --max-seconds-per-measurement 2 ${ATTENTION_BENCH_ARGS:-}"
  "train_step_1b|150|$PY bench/train_gpu.py --json $OUTDIR/train_gpu.json --time_budget_s 120 --steps 3 --objectives masked,block --attention pallas,xla --dispatch pallas --remat dots --fit_lengths 32768 --fit_attention pallas --profile ${PROFILE_DIR:-/tmp/gpu_check_profile} ${TRAIN_BENCH_ARGS:-}"
  "pallas_gmm_tests|35|DIFFGEMMA_PALLAS_GPU=${DIFFGEMMA_PALLAS_GPU:-1} $PY -m pytest -q -p no:cacheprovider tests/test_pallas_gmm.py"
  "mosaic_gmm_tests|35|DIFFGEMMA_PALLAS_GPU=${DIFFGEMMA_PALLAS_GPU:-1} $PY -m pytest -q -p no:cacheprovider tests/test_pallas_mosaic_gmm.py"
  "gmm_benchmark|30|$PY bench/gmm_gpu.py --json $OUTDIR/gmm_gpu.json --shapes diffgemma_up --time-budget-s 16 --max-seconds-per-measurement 2 ${GMM_BENCH_ARGS:-}"
  "sampler_batches|60|$PY bench/generate.py --json --random_weights --repeats 1 --time_budget_s 40 --gen_length 128 --batch_sizes 1,32 --diffusion_config configs/pretrain_gpu_1b.py --ar_config configs/pretrain_gpu_1b.py --block_config configs/pretrain_gpu_1b.py --override model.scan_layers=False --only 'ar,block_fused threshold 0.9' > $OUTDIR/generate_batches.json"
)

failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<< "$step"
  if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ ",$GPU_CHECK_ONLY," != *",$name,"* ]]; then
    continue
  fi
  echo "== $name (timeout ${limit}s): $command"
  start=$SECONDS
  if timeout -k 10 "$limit" bash -c "$command" > "$OUTDIR/$name.log" 2>&1; then
    status=ok
  else
    status="FAILED (exit $?)"
    failed=1
  fi
  line="$name: $status in $((SECONDS - start))s (log: $OUTDIR/$name.log)"
  echo "$line" | tee -a "$OUTDIR/summary.txt"
  tail -n 25 "$OUTDIR/$name.log"
done
# The device machines return at most 8 files from $OUT: there, the logs travel as one archive.
if [ -n "${OUT:-}" ] && [ "$OUTDIR" = "$(cd "$OUT" && pwd)" ]; then
  (cd "$OUTDIR" && tar czf logs.tar.gz ./*.log ./*.csv 2>/dev/null && rm -f ./*.log ./*.csv) || true
fi
exit "$failed"
