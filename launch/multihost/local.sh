#!/usr/bin/env bash
# Starts N processes of an entry point on this machine, joined by JAX's distributed runtime (CPU, for trying
# multi-host code paths and for the tests): the trainer by default; every argument after N goes to it unchanged:
#
#   launch/multihost/local.sh 2 --config configs/pretrain_tiny.py --workdir /tmp/run --config.mesh.shape='(2,1,4,1)'
#
# ENTRY names another entry point that joins the runtime: the held-out evaluation (launch.evaluate, diffgemma-eval)
# or the scorer (launch.score, diffgemma-score),
# which then computes one bound on a mesh spanning the processes, each loading its share of the rows:
#
#   ENTRY=launch.evaluate launch/multihost/local.sh 2 --config configs/pretrain_tiny.py --workdir /tmp/run \
#       --config.mesh.shape='(2,4,1,1)' --output /tmp/run/eval.json
#
# The other readers (generate, score, export, lm-eval, inspect) never join the runtime: started by this script each
# process would be a separate one-process run (docs/multihost.md).
#
# Environment: ENTRY (the module run as `python -m ENTRY`, default launch.train, which also gets --no_progress),
# DEVICES_PER_PROCESS (fake CPU devices per process, default 4), COORDINATOR_PORT (default: a free port), PYTHON
# (default: python). Process i logs to $WORKDIR_LOGS/process_i.log if WORKDIR_LOGS is set, else process 0 writes to
# this terminal and the others to /dev/null. Exits non-zero if any process fails; a failure stops the others.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: [ENTRY=launch.evaluate] $0 NUM_PROCESSES --config FILE --workdir DIR [--config.key=value ...]" >&2
  exit 2
fi
num_processes=$1
shift
entry=${ENTRY:-launch.train}
if [[ ! "$entry" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]]; then
  echo "$0: ENTRY=$entry is not a module name (e.g. launch.train, launch.evaluate)" >&2
  exit 2
fi
entry_flags=()
if [[ "$entry" == launch.train ]]; then
  entry_flags=(--no_progress)  # the trainer's progress bar; the other entry points have no such flag
fi
python=${PYTHON:-python}
devices=${DEVICES_PER_PROCESS:-4}
port=${COORDINATOR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap cleanup INT TERM

start() {  # process $1 of $num_processes; the rest of the arguments go to the entry point
  local i=$1
  shift
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${XLA_FLAGS:-}" \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$num_processes" JAX_PROCESS_ID="$i" \
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
    exec "$python" -m "$entry" ${entry_flags[@]+"${entry_flags[@]}"} "$@"  # in the background: $! is the process
}

for ((i = 0; i < num_processes; i++)); do
  if [[ -n "${WORKDIR_LOGS:-}" ]]; then
    mkdir -p "$WORKDIR_LOGS"
    start "$i" "$@" >"$WORKDIR_LOGS/process_$i.log" 2>&1 &
  elif [[ $i -eq 0 ]]; then
    # this script's own output, shared, not reopened: `>/dev/stdout` would truncate a file it is redirected to
    # and write over what the caller wrote there
    start "$i" "$@" 2>&1 &
  else
    start "$i" "$@" >/dev/null 2>&1 &
  fi
  pids+=($!)
done

# Wait for the first process to finish, then the next...; the first failure stops the rest (they would otherwise
# wait at their next collective until the runtime's heartbeat times out). Status 4 is no failure: SIGTERM stopped
# the run and every process saves the same step (the evaluation: stops after the same batch) and exits 4 by itself,
# so the others are left to finish their save.
status=0
for ((left = num_processes; left > 0; left--)); do
  code=0
  wait -n || code=$?
  if [[ $code -eq 4 && $status -eq 0 ]]; then
    status=4
  elif [[ $code -ne 0 && $code -ne 4 && ( $status -eq 0 || $status -eq 4 ) ]]; then
    status=$code
    echo "local.sh: a $entry process exited with status $code; stopping the others" >&2
    cleanup
  fi
done
exit $status
