#!/usr/bin/env bash
# The benchmark matrix behind docs/PERFORMANCE.md: `sbrender bench` once per
# set of perf switches, each run a JSON report in $REPORTS plus its table.
#   MODEL=sd15-random SIZE=512x512 examples/bench/matrix.sh     (a GPU box)
#   MODEL=tiny-random SIZE=64x64 JOBS=24 examples/bench/matrix.sh cpu
# PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -uo pipefail
SET=${1:-gpu}
MODEL=${MODEL:-sd15-random}
SIZE=${SIZE:-512x512}
JOBS=${JOBS:-8}
REPORTS=${REPORTS:-bench-reports}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$REPORTS"

bench() {  # name, then sbrender bench arguments
  local name=$1; shift
  echo "== $name: sbrender bench --model $MODEL --size $SIZE $*"
  "$PYTHON" -m sbrender bench --model "$MODEL" --size "$SIZE" --report "$REPORTS/$name.json" "$@" \
    2> >(grep -v '^\[transformers\]' >&2) | tee "$REPORTS/$name.txt"
}

if [ "$SET" = cpu ]; then
  bench cpu-eager --jobs "$JOBS" --batch 4 --latency-jobs 20
  bench cpu-eager-b8 --jobs "$JOBS" --batch 8 --latency-jobs 0
  exit
fi
bench eager --jobs "$JOBS" --batch 4 --latency-jobs 5
bench channels-last --jobs "$JOBS" --batch 4 --latency-jobs 0 --set perf.channels_last=true
bench fuse-qkv --jobs "$JOBS" --batch 4 --latency-jobs 0 --set perf.fuse_qkv=true
bench classic-attention --jobs 4 --batch 1 --latency-jobs 0 --set perf.attention=classic
bench compiled --jobs 16 --batch 8 --latency-jobs 5 --set perf.compile=default \
  --set perf.channels_last=true --set perf.fuse_qkv=true
bench vae-tiling-on --size 1024x1024 --jobs 2 --batch 1 --latency-jobs 0 --set perf.vae_tiling=on
bench vae-tiling-off --size 1024x1024 --jobs 2 --batch 1 --latency-jobs 0 --set perf.vae_tiling=off
