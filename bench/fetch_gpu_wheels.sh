#!/usr/bin/env bash
# Wheels the GPU machines' image lacks (Python 3.12 there), downloaded here into .whl/ for bench/gpu_check.sh.
#
#   bash bench/fetch_gpu_wheels.sh        then carry ".whl" with the device call that runs bench/gpu_check.sh
#
# The image has jax/jaxlib 0.11.2 with CUDA, flax, optax, orbax-checkpoint, sentencepiece, absl-py, etils,
# protobuf, psutil, pyyaml and tensorboard, but not grain (and its array_record, portpicker), ml_collections,
# tensorboardX or tokamax. The versions are the ones this repository is tested with.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PY="${PYTHON:-python3}"
PACKAGES=(grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5)
# tokamax (one of bench/gmm_gpu.py's baselines; it needs Python >= 3.12 and jax >= 0.11.1, so it is not installed
# here) and what its import needs beyond the image. Its __init__ also imports xprof (32 MB), which the benchmark
# stubs when absent: ragged_dot does not use it.
PACKAGES+=(tokamax==0.0.17 einshape==1.0 qwix==0.1.8 immutabledict==4.3.1 pydantic==2.14.4 pydantic_core==2.50.5
           annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0)
rm -rf .whl && mkdir -p .whl
for package in "${PACKAGES[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$package"
done
ls -l .whl
du -sh .whl
