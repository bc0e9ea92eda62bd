#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md on a machine lent for 15 minutes, with nothing to download there.
#
#   bash benchmarks/gpu_lease.sh prepare          # here: pydantic's wheels into .whl/, MNIST gzipped into data/ (both
#                                                 # ignored)
#   bash benchmarks/gpu_lease.sh device STAGES    # there, as the device tool's command, carrying .whl and data:
#                                                 # installs ddpmkit, runs benchmarks/gpu.py --stages STAGES, and
#                                                 # copies its figures to $OUT
#
# A lease's commands stop at 10 minutes and its 15 minutes include the machine's start: run `device run` first (the
# recipe's own figure), then `device bench,profile` on the same warm machine (gpu-bench/ is ignored, so it stays
# there between calls; the summary sets the run beside the bench in either order). The lent image has torch,
# Triton, timm, einops, typer, rich, pluggy, safetensors, torchmetrics and matplotlib; pydantic is the one
# dependency it lacks.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  prepare)
    # the versions this checkout's venv resolved, as wheels for the lent machine's Python 3.12
    python=.venv/bin/python
    [ -x "$python" ] || python=python3
    pins=$("$python" -m pip list --format=freeze 2>/dev/null \
           | grep -i -E '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|typing[-_]extensions)==' || true)
    [ -n "$pins" ] || { echo "no pydantic in $python's environment: install ddpmkit first" >&2; exit 2; }
    rm -rf .whl && mkdir -p .whl
    # shellcheck disable=SC2086
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl $pins
    # MNIST gzipped (11 MB instead of 55: the checkout and the wheels must fit beside it in the 64 MiB a call
    # carries); `device` unpacks it there
    root="${DDPMKIT_DATA_ROOT:-../shared/data}"
    rm -rf data && mkdir -p data/MNIST/raw
    for f in "$root"/MNIST/raw/*-ubyte; do gzip -c "$f" > "data/MNIST/raw/$(basename "$f").gz"; done
    du -sh .whl data
    echo 'now: the device tool with carry [".whl", "data"] and command: bash benchmarks/gpu_lease.sh device run'
    ;;
  device)
    stages="${2:?which stages: run, then bench,profile (or all three: bench,profile,run)}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 - <<'UNPACK'
import gzip, pathlib, shutil
for packed in pathlib.Path("data/MNIST/raw").glob("*.gz"):
    if not packed.with_suffix("").exists():
        with gzip.open(packed) as src, open(packed.with_suffix(""), "wb") as dst:
            shutil.copyfileobj(src, dst)
UNPACK
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 -c 'import torch; print("torch", torch.__version__)'
    status=0
    # sampling's figures are in docs/benchmarks.md already (CUDA graphs are for training): the lease's minutes train
    python3 benchmarks/gpu.py --out gpu-bench --data-root data --stages "$stages" --no-sample 2>&1 | tee gpu-bench-"${stages//,/-}".log \
      || status=$?
    if [ -n "${OUT:-}" ]; then
      cp gpu-bench/*.json gpu-bench/*.txt gpu-bench/run.log gpu-bench-*.log "$OUT"/ 2>/dev/null || true
      cp gpu-bench/runs/*/metrics.jsonl "$OUT"/ 2>/dev/null || true
    fi
    exit "$status"
    ;;
  *)
    sed -n '2,14p' "$0" >&2
    exit 2
    ;;
esac
