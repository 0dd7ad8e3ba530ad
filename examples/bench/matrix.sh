#!/usr/bin/env bash
# The benchmark matrix behind docs/PERFORMANCE.md: `sbrender bench` once per
# set of perf switches, each run's JSON report and table in $REPORTS.
#   examples/bench/matrix.sh                       every GPU row (sd15-random, 512x512)
#   examples/bench/matrix.sh eager compiled        some rows
#   MODEL=tiny-random SIZE=64x64 JOBS=24 examples/bench/matrix.sh cpu
# PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -uo pipefail
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

row() {
  case $1 in
    cpu) bench cpu --jobs "$JOBS" --batch 4 --latency-jobs 20 ;;
    eager) bench eager --jobs "$JOBS" --batch 4 --latency-jobs 5 ;;
    eager-tmpfs) bench eager-tmpfs --jobs "$JOBS" --batch 4 --latency-jobs 0 --spool /dev/shm ;;
    no-cudnn-benchmark) bench no-cudnn-benchmark --jobs "$JOBS" --batch 1 --latency-jobs 0 \
        --set perf.cudnn_benchmark=false ;;
    channels-last) bench channels-last --jobs "$JOBS" --batch 4 --latency-jobs 0 --set perf.channels_last=true ;;
    fuse-qkv) bench fuse-qkv --jobs "$JOBS" --batch 4 --latency-jobs 0 --set perf.fuse_qkv=true ;;
    classic-attention) bench classic-attention --jobs 4 --batch 1 --latency-jobs 0 --set perf.attention=classic ;;
    compiled) bench compiled --jobs 16 --batch 8 --latency-jobs 5 --set perf.compile=default \
        --set perf.channels_last=true --set perf.fuse_qkv=true ;;
    graphs) bench graphs --jobs 16 --batch 8 --latency-jobs 5 --set perf.compile=reduce-overhead \
        --set perf.channels_last=true --set perf.fuse_qkv=true ;;
    graphs-b16) bench graphs-b16 --jobs 32 --batch 16 --latency-jobs 5 --set perf.compile=reduce-overhead \
        --set perf.channels_last=true --set perf.fuse_qkv=true ;;
    vae-tiling) bench vae-tiling-off --size 1024x1024 --jobs 2 --batch 1 --latency-jobs 0 --set perf.vae_tiling=off
                bench vae-tiling-on --size 1024x1024 --jobs 2 --batch 1 --latency-jobs 0 --set perf.vae_tiling=on ;;
    *) echo "unknown row $1" >&2; return 2 ;;
  esac
}

rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(eager eager-tmpfs no-cudnn-benchmark channels-last fuse-qkv classic-attention compiled graphs vae-tiling)
for r in "${rows[@]}"; do row "$r"; done
