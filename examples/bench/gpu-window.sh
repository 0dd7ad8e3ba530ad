#!/usr/bin/env bash
# One GPU window (issue 15), at most 9 minutes on an H100/H200: versions, the
# compiled batch sizes cold then warm, a bench and a profile per size, and the
# bundle of compiled code. Everything lands in $OUT as it is measured:
#   report.md     what a person reads          report.json  the same, for scripts
#   run.log       every part's output           bundle.sbcc  the compiled artifacts (split into
#                                               bundle.sbcc.part-NN over 15 MiB: cat them back)
# Each part runs under its own time limit inside the window's budget; a part
# that fails or runs out of time is noted and the next one runs; the exit status
# is 1 when any did.
#
#   examples/bench/gpu-window.sh                  on the GPU machine (sd15-random, 512x512, 28 steps,
#                                                 DPM++ 2M Karras, CFG 7, float16, CUDA graphs, batch 1, 8, 16)
#   examples/bench/gpu-window.sh --cpu-dry-run    every part on this CPU with tiny-random (minutes)
#
# Environment: OUT (default ./gpu-window-out), WORK (model, caches, spools; default
# /tmp/sbrender-gpu-window), PYTHON (default .venv/bin/python, else python3), BUDGET_S
# (default 540), BUCKETS (default 1,8,16), COMPILE (default reduce-overhead),
# KEEP_COMPILE_CACHE=1 to start warm. On the GPU machine the image's python3 has
# torch but not diffusers and a few others: examples/bench/gpu-wheels.sh fetches
# them into .whl/, carried with the call and installed here into $WORK/site;
# sbrender itself is found through PYTHONPATH.
set -uo pipefail
START=$SECONDS
cd "$(dirname "$0")/../.." || exit 2
MODE=gpu
[ "${1:-}" = "--cpu-dry-run" ] && MODE=cpu
OUT=${OUT:-gpu-window-out}
WORK=${WORK:-/tmp/sbrender-gpu-window}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$OUT" "$WORK/tmp"
export OUT=$(cd "$OUT" && pwd) PYTHON
LOG=$OUT/run.log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null && ! "$PYTHON" -c "import diffusers, structlog, watchdog" 2>/dev/null; then
  # carried to the GPU machine: see gpu-wheels.sh
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH#"$PWD"}"
fi
# A fresh temp folder, as the unit's PrivateTmp gives: nothing may rely on /tmp.
export TMPDIR=$WORK/tmp
export SBRENDER_CACHE=$WORK/cache SBRENDER_OFFLINE=true SBRENDER_LOG_FORMAT=json SBRENDER_METRICS_DIR=off
export SBRENDER_DEFAULTS_SAMPLER="DPM++ 2M" SBRENDER_DEFAULTS_SCHEDULER=Karras SBRENDER_DEFAULTS_GUIDANCE_SCALE=7
if [ "$MODE" = gpu ]; then
  BUDGET_S=${BUDGET_S:-540}
  export SBRENDER_MODEL=sd15-random SBRENDER_DEVICE=cuda SBRENDER_DTYPE=float16
  export SBRENDER_DEFAULTS_WIDTH=512 SBRENDER_DEFAULTS_HEIGHT=512 SBRENDER_DEFAULTS_STEPS=28
  export SBRENDER_PERF_COMPILE=${COMPILE:-reduce-overhead} SBRENDER_PERF_COMPILE_BUCKETS=${BUCKETS:-1,8,16}
  export SBRENDER_PERF_CHANNELS_LAST=true SBRENDER_PERF_FUSE_QKV=true
  LIMITS=(versions=30 model=150 cold=300 warm=120 bundle=30 bench=240)
else  # the same parts, small: a tiny model on the CPU, one compiled size
  BUDGET_S=${BUDGET_S:-900}
  export SBRENDER_MODEL=tiny-random SBRENDER_DEVICE=cpu SBRENDER_DTYPE=float32 OMP_NUM_THREADS=1
  export SBRENDER_DEFAULTS_WIDTH=64 SBRENDER_DEFAULTS_HEIGHT=64 SBRENDER_DEFAULTS_STEPS=4
  export SBRENDER_PERF_COMPILE=${COMPILE:-default} SBRENDER_PERF_COMPILE_BUCKETS=${BUCKETS:-1}
  LIMITS=(versions=60 model=60 cold=600 warm=180 bundle=60 bench=240)
fi
export SBRENDER_PERF_BATCH_SIZE=${SBRENDER_PERF_COMPILE_BUCKETS##*,}
[ "${KEEP_COMPILE_CACHE:-0}" = 1 ] || rm -rf "$WORK/cache/compile" "$WORK"/spool-*

note() { printf '%s\n\n' "$*" >>"$OUT/report.md"; echo "== $*" >>"$LOG"; }

limit_of() { local kv; for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

# part NAME COMMAND...: run it under min(its limit, what is left of the budget).
part() {
  local name=$1; shift
  local left=$(( BUDGET_S - (SECONDS - START) - 5 )) limit
  limit=$(limit_of "$name")
  (( limit > left )) && limit=$left
  if (( limit < 15 )); then note "part $name: skipped, ${left} s of the budget left"; return 0; fi
  local t0=$SECONDS rc
  echo "== part $name (limit $limit s) at +$((SECONDS - START)) s" >>"$LOG"
  PART_LIMIT=$limit timeout --kill-after=10 "$limit" bash -c '"$@"' part "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) note "part $name: done in $((SECONDS - t0)) s" ;;
    124|137) note "part $name: **stopped at its limit of $limit s**; what it measured is above"; FAILED+=("$name") ;;
    *) note "part $name: **failed (exit $rc)** after $((SECONDS - t0)) s; see run.log"; FAILED+=("$name") ;;
  esac
}
FAILED=()

driver() { "$PYTHON" examples/bench/gpu_window.py --report "$OUT" "$@"; }

export_bundle() {
  "$PYTHON" -m sbrender compile-cache export "$OUT/bundle.sbcc" || return $?
  local size; size=$(stat -c %s "$OUT/bundle.sbcc")
  if (( size > 15 * 1024 * 1024 )); then  # what comes back from the machine: 16 MiB a file
    split -b 15M -d "$OUT/bundle.sbcc" "$OUT/bundle.sbcc.part-" && rm "$OUT/bundle.sbcc"
    echo "bundle of $size bytes split: cat bundle.sbcc.part-* > bundle.sbcc" >>"$OUT/report.md"
  fi
}

note "# GPU window ($MODE): $SBRENDER_MODEL, ${SBRENDER_DEFAULTS_WIDTH}x${SBRENDER_DEFAULTS_HEIGHT}, \
$SBRENDER_DEFAULTS_STEPS steps, DPM++ 2M Karras, CFG 7, $SBRENDER_DTYPE, compile $SBRENDER_PERF_COMPILE, \
batch sizes $SBRENDER_PERF_COMPILE_BUCKETS; budget $BUDGET_S s; $(date -u +%FT%TZ)"
if ! "$PYTHON" -c "import torch, diffusers, sbrender" >>"$LOG" 2>&1; then
  note "cannot import torch, diffusers and sbrender with $PYTHON: nothing measured (see run.log)"
  exit 2
fi
export -f driver export_bundle
part versions driver versions
part model driver model
part cold driver start --label cold --work "$WORK"
part warm driver start --label warm --work "$WORK"
part bundle export_bundle
part bench driver bench
note "window used $((SECONDS - START)) s of $BUDGET_S; parts failed or stopped: ${FAILED[*]:-none}"
[ ${#FAILED[@]} -eq 0 ]
