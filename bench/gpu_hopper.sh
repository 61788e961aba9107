#!/usr/bin/env bash
# FLUX.2 [klein] 4B on one Hopper GPU (H100, H200), with no network, in one run of about 10 minutes:
#   1. the GPU test suite (pytest -m gpu: the served image against diffusers in fp32 on the GPU, batched
#      against single, FP8 and compile on the tiny checkpoint), stopping here if it fails;
#   2. a random-weight 4B checkpoint (seconds);
#   3. bench/gpu_bench.py: diffusers eager, diffusers compiled, and our Triton stack (`build --runtime torch
#      --device gpu`, FP8 DiT GEMMs, torch.compile, leaves warmed for the benchmark's size) at concurrency
#      1, 2, 4, 8; FP8 against BF16; per-model times; serving overhead; start time. report.md in $OUT.
#
# Before, where pip reaches the index:   python bench/carry_wheels.py     (fills .whl/, checks the 64 MiB)
# There, anywhere:                        bash bench/gpu_hopper.sh
# Commit the report under bench/results/ as <date>-<gpu>-<commit>.md (it names all three).
#
# Assumes python3 with torch (CUDA), numpy, transformers, tokenizers, safetensors, Pillow and setuptools,
# as that machine has; .whl/ brings nvidia-pytriton (tritonserver), diffusers, torchao, pytest and numpy
# 1.26 (for the Triton models only). Environment: WORK (default /tmp/flux2-bench; ~17 GB of checkpoint),
# OUT (report folder, default WORK/report), PYTHON (python3), CONFIG (component configs; default the
# package's flux2_klein/configs/flux2-klein-4b.json), SIZE (1024x1024), REQUESTS (6), CONCURRENCY (1,2,4,8),
# ROUNDS (3), PRECISION (fp8), COMPILE (default; '' for eager leaves), DIFFUSERS_COMPILE (default; '' skips
# that phase), SKIP_TESTS (1 skips step 1). CPU rehearsal of this very script: WHEELS (a folder of wheels for
# that Python), DEVICE=cpu, TINY=1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-$ROOT/.whl}
DEVICE=${DEVICE:-gpu}
mkdir -p "${WORK:=/tmp/flux2-bench}" "${OUT:=$WORK/report}"
WORK=$(cd "$WORK" && pwd)
REPORT=$(cd "$OUT" && pwd)
SITE=$WORK/site              # the carried packages and this project, for every process here (PYTHONPATH)
STUB_NUMPY=$WORK/stub-numpy  # numpy 1.26, for Triton's Python models only (gpu_bench.py --stub-site)
cd "$WORK"  # not the checkout: its raw flux2_klein/ folder would shadow the installed package
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
stamp() { echo "[$((SECONDS - START)) s] $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: no answer"
"$PY" -c 'import sys, torch, numpy, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.is_available(), "| numpy", numpy.__version__, "| transformers", transformers.__version__)'

stamp "install the carried wheels and this project into $SITE"
shopt -s nullglob
numpy1=("$WHEELS"/numpy-1.*.whl)
others=()
for w in "$WHEELS"/*.whl; do
  case "$(basename "$w")" in numpy-1.*) ;; *) others+=("$w") ;; esac
done
if [ ${#numpy1[@]} -ne 1 ] || [ ${#others[@]} -lt 2 ]; then
  echo "error: $WHEELS/ must hold numpy 1.x, nvidia-pytriton, diffusers, torchao, pytest (python bench/carry_wheels.py)" >&2
  exit 2
fi
pip_target() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pip_target "$SITE" "${others[@]}"
pip_target "$STUB_NUMPY" "${numpy1[@]}"
if ! pip_target "$SITE" --no-build-isolation "$ROOT"; then
  # The same layout as pyproject.toml's package-dir, by hand.
  echo "pip could not build this project here; copying its packages instead"
  rm -rf "$SITE/flux2_klein" && cp -r "$ROOT/flux2_klein" "$SITE/flux2_klein"
  for sub in export client model_repository; do cp -r "$ROOT/$sub" "$SITE/flux2_klein/$sub"; done
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import diffusers, flux2_klein, flux2_klein.model_repository; print("diffusers", diffusers.__version__, "| flux2_klein from", flux2_klein.__file__)'

stamp "preflight: tritonserver and its stub, libpython, the Triton models' clean environment"
"$PY" "$ROOT/bench/gpu_bench.py" check --work "$WORK/run" --device "$DEVICE" --stub-site "$STUB_NUMPY" \
  --precision "${PRECISION:-fp8}"

if [ "${SKIP_TESTS:-0}" != 1 ] && [ "$DEVICE" = gpu ]; then
  stamp "GPU test suite (pytest -m gpu)"
  # The tests start Triton themselves; they take the models' numpy 1.x from this variable.
  FLUX2_KLEIN_STUB_SITE=$STUB_NUMPY "$PY" -m pytest -q -m gpu -p no:cacheprovider --rootdir "$ROOT" \
    "$ROOT/tests/test_gpu.py" 2>&1 | tee "$REPORT/gpu-tests.txt"
fi

if [ "${TINY:-0}" = 1 ]; then
  CHECKPOINT=(--tiny)
else
  CONFIG=${CONFIG:-$ROOT/flux2_klein/configs/flux2-klein-4b.json}
  CKPT=$WORK/checkpoint
  if [ ! -f "$CKPT/model_index.json" ]; then
    stamp "random bf16 checkpoint of $CONFIG"
    "$PY" -m flux2_klein.cli tiny --config "$CONFIG" --out "$CKPT"
  fi
  du -sh "$CKPT"
  CHECKPOINT=(--checkpoint "$CKPT")
fi

stamp "benchmark: diffusers eager, diffusers compiled, Triton"
"$PY" "$ROOT/bench/gpu_bench.py" all "${CHECKPOINT[@]}" --work "$WORK/run" --device "$DEVICE" \
  --size "${SIZE:-1024x1024}" --requests "${REQUESTS:-6}" --concurrency "${CONCURRENCY:-1,2,4,8}" \
  --rounds "${ROUNDS:-3}" --precision "${PRECISION:-fp8}" --compile "${COMPILE-default}" \
  --diffusers-compile "${DIFFUSERS_COMPILE-default}" --ready-timeout 420 \
  --stub-site "$STUB_NUMPY" --report-dir "$REPORT"
stamp "done; report in $REPORT/report.md"
