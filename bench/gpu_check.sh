#!/usr/bin/env bash
# One command for the GPU checks: bench/gpu_check.sh [OUTDIR]   (OUTDIR defaults to $OUT, else ./gpu_check_out)
#
# Runs each step below with its own timeout and log (OUTDIR/<step>.log), keeps going when one fails, writes
# OUTDIR/summary.txt, and exits non-zero if any step failed. The timeouts add up to under 10 minutes (585 s).
# When OUTDIR is $OUT (the device machines, which return at most 8 files) the logs are packed into logs.tar.gz.
# The kernel benchmark (issue #4's table; it checks every result against the reference itself) runs first, so a
# slow compile elsewhere cannot cost it its time. kernel_resources is the kernels' resource report (registers per thread, shared memory per block, theoretical and
# achieved occupancy) from Nsight Compute for our forward, dlhs and drhs launches on the Mixtral shape.
# To add a check, append "name|timeout_seconds|command" to STEPS.
# Dry run on a CPU: DIFFGEMMA_PALLAS_GPU=0 GMM_BENCH_ARGS="--interpret --small --runs 3" bench/gpu_check.sh /tmp/out
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
  "gmm_benchmark|175|$PY bench/gmm_gpu.py --json $OUTDIR/gmm_gpu.json --time-budget-s 145 --max-seconds-per-measurement 4 ${GMM_BENCH_ARGS:-}"
  "kernel_resources|35|ncu --kernel-name regex:gmm --launch-count 8 --section LaunchStats --section Occupancy --csv --page details $PY bench/gmm_gpu.py --shapes mixtral_up --impls ours --runs 1 --warmup 0 --copies 1 > $OUTDIR/kernel_resources.csv"
  "pallas_gmm_tests|75|DIFFGEMMA_PALLAS_GPU=${DIFFGEMMA_PALLAS_GPU:-1} $PY -m pytest -q -p no:cacheprovider tests/test_pallas_gmm.py"
  "train_step_benchmark|65|$PY bench/train_cpu.py --json --steps 10 --batch_size 16 --seq_len 512 --backends ragged,pallas > $OUTDIR/train_step.json"
  "sampler_benchmark|100|$PY bench/generate.py --json --random_weights --repeats 1 --time_budget_s 50 --diffusion_config configs/pretrain_gpu_1b.py --ar_config configs/pretrain_gpu_1b.py --block_config configs/pretrain_gpu_1b.py --override model.scan_layers=False --only 'ar,threshold 0.9,block_fused threshold 0.9' > $OUTDIR/generate.json"
  "sampler_batches|120|$PY bench/generate.py --json --random_weights --repeats 1 --time_budget_s 85 --gen_length 128 --batch_sizes 1,8,32,64 --diffusion_config configs/pretrain_gpu_1b.py --ar_config configs/pretrain_gpu_1b.py --block_config configs/pretrain_gpu_1b.py --override model.scan_layers=False --only 'ar,block_fused threshold 0.9' > $OUTDIR/generate_batches.json"
)

failed=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<< "$step"
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
