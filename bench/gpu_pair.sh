#!/usr/bin/env bash
# The trained diffusion-vs-AR speed experiment, one command for a GPU machine: bench/gpu_pair.sh [OUTDIR]
# (OUTDIR defaults to $OUT, else ./gpu_pair_out). Under 9 minutes: bench/gpu_pair.py's phases have budgets that sum
# to about 8 minutes (corpus ~40 s, AR 140 s, block 140 s, the ceiling ~15 s, generation 130 s) and the whole
# command a hard timeout of 545 s; OUTDIR/gpu_pair.json is rewritten after every phase, so a cut run still reports.
# Writes gpu_pair.json, samples.txt, gpu_pair.log and logs.tar.gz (the two runs' metrics.jsonl and manifests).
# Wheels the image lacks travel in .whl/ (bench/fetch_gpu_wheels.sh; carry .whl with the device call).
# CPU dry run: bench/gpu_pair.sh /tmp/pair_out --smoke
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$REPO/gpu_pair_out}}"
shift || true
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="${GPU_PAIR_WORK:-/tmp/gpu_pair_work}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
cd "$REPO"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUTDIR/wheels.log" 2>&1 && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}" \
    || echo "wheels: install from .whl failed (see wheels.log)" >&2
fi
export PYTHONPATH="$REPO:${PYTHONPATH:-}"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null; uptime; nproc; } \
  > "$OUTDIR/gpu_pair.log" 2>&1
timeout -k 10 "${GPU_PAIR_TIMEOUT:-545}" "$PY" bench/gpu_pair.py --out "$OUTDIR" --workdir "$WORK" "$@" \
  >> "$OUTDIR/gpu_pair.log" 2>&1
status=$?
echo "gpu_pair.py exit status $status" >> "$OUTDIR/gpu_pair.log"
(cd "$WORK" && tar czf "$OUTDIR/logs.tar.gz" ar/metrics.jsonl block/metrics.jsonl data/manifest.json 2>/dev/null) || true
tail -n 40 "$OUTDIR/gpu_pair.log"
exit "$status"
