#!/usr/bin/env bash
# FLUX.2 [klein] 4B on one Hopper GPU (H100, H200), with no network, in phases that fit one 8-minute call:
#   setup       install the carried wheels and this project; preflight (tritonserver, its stub, the models' env)
#   smoke       the exact served configuration (bf16 boundary, torch leaves, FP8 GEMMs, torch.compile) on the
#               tiny checkpoint: ready, two requests answered, zero compiles after warm-up (two minutes at most)
#   checkpoint  a random-weight 4B checkpoint (~17 GB)
#   diffusers   diffusers eager on the same checkpoint: the baseline; FP8 against BF16 (PSNR, velocity error)
#   triton      our stack on the 4B checkpoint (`build --runtime torch --device gpu`, FP8, compile, leaves
#               warmed for exactly what this run sends), latency and images/s, per-model and per-network times,
#               serving overhead, compiles after warm-up
#   diffusers-compiled   diffusers with torch.compile (transformer, VAE decoder)
#   gpu-tests   the GPU test suite (pytest -m gpu)
# Each phase runs under `timeout`, writes its result as it goes (after every level), and then the report is
# rebuilt from every result so far into OUT (report.md, report.json, images, the server log, gpu-tests.txt,
# phases.log: at most 8 files, what the device tool brings back). A failed or cut-short phase is logged and
# the next one runs. With a time budget (BUDGET_S, default 480 s), a phase starts only when its minimum fits
# in what is left, and runs at most until the budget ends. Short defaults are sized for it; LONG=1 is the full
# run for your own machine (no budget; concurrency 1,2,4,8; more requests; the compiled baseline and the tests).
#
# Before, where pip reaches the index:   python bench/carry_wheels.py     (fills .whl/, checks the 64 MiB)
# There:                                  bash bench/gpu_hopper.sh           (PHASES=... runs a subset, e.g.
#                                         PHASES=diffusers-compiled,gpu-tests on a machine still warm)
# Commit the report under bench/results/ as <date>-<gpu>-<commit>.md (it names all three).
#
# Assumes python3 with torch (CUDA), numpy, transformers, tokenizers, safetensors, Pillow and setuptools,
# as that machine has; .whl/ brings nvidia-pytriton (tritonserver), diffusers, torchao, pytest and numpy
# 1.26 (for the Triton models only). Environment: WORK (default /tmp/flux2-bench; ~17 GB of checkpoint),
# OUT (report folder, default WORK/report), PYTHON (python3), CONFIG (component configs; default the
# package's flux2_klein/configs/flux2-klein-4b.json), SIZE (1024x1024), REQUESTS (4; LONG 8), CONCURRENCY
# (1,4; LONG 1,2,4,8), ROUNDS (2; LONG 3), PRECISION (fp8), COMPILE (default; '' for eager leaves),
# DIFFUSERS_COMPILE (default; '' skips that phase), PHASES (all), BUDGET_S (480; LONG 0 = none), LONG,
# TIMEOUT_SCALE (1: multiplies every phase's timeouts, for a slower machine).
# CPU rehearsal of this very script: WHEELS (a folder of wheels for that Python), DEVICE=cpu, TINY=1,
# TIMEOUT_SCALE=4 (compiled leaves then use torch.compile's eager backend: dynamo's guards and compile
# counts, no code generation).
#
# CPU rehearsal, 2026-12-02 (2 shared cores, Python 3.11, torch 2.13 CPU, tiny checkpoint, commit 4708013
# plus this change; `PYTHON=.venv/bin/python WHEELS=/tmp/h3-whl311 DEVICE=cpu TINY=1 COMPILE= DIFFUSERS_COMPILE=
# BUDGET_S=0 TIMEOUT_SCALE=4 bash bench/gpu_hopper.sh`): setup 27 s, smoke 170 s (ready in 116 s, zero
# compiles after warm-up), triton 161 s, diffusers 127 s, gpu-tests 3 s (skipped: no CUDA); 492 s in all.
# Details, a timeout and a budget run: bench/results/2026-12-02-cpu-rehearsal-gpu_hopper.md. Those are a
# CPU's seconds; on the GPU the phases' timeouts below bound them (none measured there yet).
set -uo pipefail  # no -e: a failed phase must not stop the others

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # a relative path survives the cd below
WHEELS=${WHEELS:-$ROOT/.whl}
DEVICE=${DEVICE:-gpu}
LONG=${LONG:-0}
mkdir -p "${WORK:=/tmp/flux2-bench}" "${OUT:=$WORK/report}"
WORK=$(cd "$WORK" && pwd)
REPORT=$(cd "$OUT" && pwd)
RUN=$WORK/run                # gpu_bench.py's folder: repositories, logs, images, each phase's result
SITE=$WORK/site              # the carried packages and this project, for every process here (PYTHONPATH)
STUB_NUMPY=$WORK/stub-numpy  # numpy 1.26, for Triton's Python models only (gpu_bench.py --stub-site)
mkdir -p "$RUN"
cd "$WORK"  # not the checkout: its raw flux2_klein/ folder would shadow the installed package
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DEVICE" = cpu ]; then
  export FLUX2_KLEIN_COMPILE_BACKEND=${FLUX2_KLEIN_COMPILE_BACKEND:-eager}
fi
if [ "$LONG" = 1 ]; then
  : "${BUDGET_S:=0}" "${REQUESTS:=8}" "${CONCURRENCY:=1,2,4,8}" "${ROUNDS:=3}"
else
  : "${BUDGET_S:=480}" "${REQUESTS:=4}" "${CONCURRENCY:=1,4}" "${ROUNDS:=2}"
fi
PHASES=${PHASES:-setup,smoke,checkpoint,diffusers,triton,diffusers-compiled,gpu-tests}
SCALE=${TIMEOUT_SCALE:-1}
LOG=$REPORT/phases.log
START=$SECONDS
stamp() { echo "[$((SECONDS - START)) s] $*" | tee -a "$LOG"; }
wanted() { [[ ",$PHASES," == *",$1,"* ]]; }

# phase NAME MIN_S MAX_S CMD...: run CMD under a timeout of MAX_S (cut to what the budget leaves), if at least
# MIN_S is left; log its status and seconds to $RUN/phases.tsv; never stop the script.
phase() {
  local name=$1 min=$(($2 * SCALE)) max=$(($3 * SCALE)) left limit t0 rc status
  shift 3
  if ! wanted "$name"; then return 0; fi
  limit=$max
  if [ "$BUDGET_S" -gt 0 ]; then
    left=$((BUDGET_S - (SECONDS - START)))
    if [ "$left" -lt "$min" ]; then
      stamp "$name: skipped, ${left} s left of the ${BUDGET_S} s budget (it needs ${min} s)"
      printf '%s\tskipped (time)\t0\n' "$name" >>"$RUN/phases.tsv"
      return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  stamp "$name: start (at most ${limit} s)"
  t0=$SECONDS
  if declare -F "$1" >/dev/null; then  # a function of this script (setup): bounded by what it runs
    "$@" 2>&1 | tee -a "$LOG"
  else
    timeout --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$LOG"
  fi
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" >>"$RUN/phases.tsv"
  stamp "$name: $status in $((SECONDS - t0)) s"
  [ "$name" != setup ] && report
  return 0
}

BENCH=("$PY" "$ROOT/bench/gpu_bench.py")
BENCH_ARGS=(--work "$RUN" --device "$DEVICE" --stub-site "$STUB_NUMPY")

CKPT=$WORK/checkpoint
if [ "${TINY:-0}" = 1 ]; then CHECKPOINT=(--tiny); else CHECKPOINT=(--checkpoint "$CKPT"); fi
COMMON=(--size "${SIZE:-1024x1024}" --requests "$REQUESTS" --concurrency "$CONCURRENCY" --rounds "$ROUNDS"
        --warmup 1 --precision "${PRECISION:-fp8}" --compile "${COMPILE-default}"
        --diffusers-compile "${DIFFUSERS_COMPILE-default}")

# The report from every result so far, into $REPORT (after each phase: a later timeout loses nothing).
report() {
  local ckpt=(--tiny)
  [ "${TINY:-0}" != 1 ] && [ -f "$CKPT/model_index.json" ] && ckpt=(--checkpoint "$CKPT")
  "${BENCH[@]}" report "${BENCH_ARGS[@]}" "${ckpt[@]}" "${COMMON[@]}" --report-dir "$REPORT" >/dev/null 2>>"$LOG" \
    || echo "report: could not be written (see $LOG)" | tee -a "$LOG"
}

setup() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: no answer"
  "$PY" -c 'import sys, torch, numpy, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.is_available(), "| numpy", numpy.__version__, "| transformers", transformers.__version__)'
  shopt -s nullglob
  local numpy1=("$WHEELS"/numpy-1.*.whl) others=() w
  for w in "$WHEELS"/*.whl; do
    case "$(basename "$w")" in numpy-1.*) ;; *) others+=("$w") ;; esac
  done
  if [ ${#numpy1[@]} -ne 1 ] || [ ${#others[@]} -lt 2 ]; then
    echo "error: $WHEELS/ must hold numpy 1.x, nvidia-pytriton, diffusers, torchao, pytest (python bench/carry_wheels.py)" >&2
    return 2
  fi
  pip_target() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
  pip_target "$SITE" "${others[@]}" && pip_target "$STUB_NUMPY" "${numpy1[@]}" || return 1
  if ! pip_target "$SITE" --no-build-isolation "$ROOT"; then
    # The same layout as pyproject.toml's package-dir, by hand.
    echo "pip could not build this project here; copying its packages instead"
    rm -rf "$SITE/flux2_klein" && cp -r "$ROOT/flux2_klein" "$SITE/flux2_klein"
    for sub in export client model_repository; do cp -r "$ROOT/$sub" "$SITE/flux2_klein/$sub"; done
  fi
  "$PY" -c 'import diffusers, flux2_klein, flux2_klein.model_repository; print("diffusers", diffusers.__version__, "| flux2_klein from", flux2_klein.__file__)' \
    && "${BENCH[@]}" check "${BENCH_ARGS[@]}" --precision "${PRECISION:-fp8}"
}

export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
: >"$RUN/phases.tsv"
stamp "flux2-klein GPU bench: device $DEVICE, LONG=$LONG, budget ${BUDGET_S} s, phases $PHASES, report in $REPORT"
if wanted setup; then
  phase setup 30 120 setup
  if ! tail -n 1 "$RUN/phases.tsv" | grep -q $'\tok\t'; then
    stamp "setup failed: nothing else can run"; exit 1
  fi
fi
phase smoke 60 150 "${BENCH[@]}" smoke "${BENCH_ARGS[@]}" --tiny --size "${SMOKE_SIZE:-1024x1024}" --requests 2 --concurrency 1,2 \
  --rounds 1 --warmup 1 --precision "${PRECISION:-fp8}" --compile default --ready-timeout $((140 * SCALE))
if [ "${TINY:-0}" != 1 ] && [ ! -f "$CKPT/model_index.json" ]; then
  CONFIG=${CONFIG:-$ROOT/flux2_klein/configs/flux2-klein-4b.json}
  phase checkpoint 60 180 "$PY" -m flux2_klein.cli tiny --config "$CONFIG" --out "$CKPT"
fi
if [ "${TINY:-0}" = 1 ] || [ -f "$CKPT/model_index.json" ]; then
  # The baseline first: it is short and sure, and a triton phase cut short still leaves its latency at c = 1
  # (written before the concurrency levels), so the ratios survive a tight budget.
  phase diffusers 45 150 "${BENCH[@]}" diffusers "${BENCH_ARGS[@]}" "${CHECKPOINT[@]}" "${COMMON[@]}"
  phase triton 150 330 "${BENCH[@]}" triton "${BENCH_ARGS[@]}" "${CHECKPOINT[@]}" "${COMMON[@]}" --ready-timeout $((300 * SCALE))
  if [ -n "${DIFFUSERS_COMPILE-default}" ]; then
    phase diffusers-compiled 150 300 "${BENCH[@]}" diffusers-compiled "${BENCH_ARGS[@]}" "${CHECKPOINT[@]}" "${COMMON[@]}"
  fi
else
  stamp "no 4B checkpoint: the triton and diffusers phases cannot run"
fi
# The tests start Triton themselves; they take the models' numpy 1.x from FLUX2_KLEIN_STUB_SITE.
phase gpu-tests 120 300 env FLUX2_KLEIN_STUB_SITE="$STUB_NUMPY" "$PY" -m pytest -q -m gpu -p no:cacheprovider \
  --rootdir "$ROOT" "$ROOT/tests/test_gpu.py"
[ -f "$LOG" ] && grep -q "gpu-tests: start" "$LOG" && sed -n '/gpu-tests: start/,$p' "$LOG" >"$REPORT/gpu-tests.txt"
report
stamp "done; report in $REPORT/report.md"
cat "$REPORT/report.md" 2>/dev/null | head -60
