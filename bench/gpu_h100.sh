#!/usr/bin/env bash
# FLUX.2 [klein] 4B on one H100, with no network: Triton with PyTorch leaves (`build --runtime torch
# --device gpu`, bf16) against diffusers' Flux2KleinPipeline (bf16), same random-weight checkpoint, same
# prompts and seeds, in one run: seconds per 1024x1024 image at concurrency 1, images/s at concurrency 4,
# the ratios, and the GPU's exact name. About 6 minutes; meant to stay under 9.
#
# Before, where pip reaches the index:   python bench/carry_wheels.py     (fills .whl/, checks the 64 MiB)
#   and, if shared/ is beside the checkout rather than in it:   mkdir -p shared/configs &&
#   cp ../shared/configs/flux2-klein-4b.json shared/configs/          (../shared does not travel)
# There, anywhere:                        bash bench/gpu_h100.sh
#
# Assumes python3 (3.12) with torch (CUDA), numpy, transformers, tokenizers, safetensors, Pillow and
# setuptools, as that machine has; .whl/ brings nvidia-pytriton (tritonserver), diffusers and numpy 1.26.
# Environment: WORK (default /tmp/flux2-bench: about 17 GB of checkpoint go there), OUT (report folder:
# report.txt/.json, both first images, the server log; default WORK/report), PYTHON (python3), CONFIG (the
# component configs; default shared/configs/flux2-klein-4b.json in or beside the checkout), SIZE (1024x1024),
# REQUESTS (8), CONCURRENCY (4), CONCURRENT_REQUESTS (16), WARMUP (2), COMPILE (a torch.compile mode for
# Triton's leaves; default eager: compiling takes minutes per instance). For a CPU rehearsal of this very
# script: WHEELS (default .whl) holding wheels for that Python, DEVICE=cpu, TINY=1 (a tiny checkpoint).
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
  echo "error: $WHEELS/ must hold numpy 1.x, nvidia-pytriton and diffusers (python bench/carry_wheels.py)" >&2
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

stamp "preflight: tritonserver and its stub, libpython, the Triton models' environment"
"$PY" "$ROOT/bench/gpu_bench.py" check --work "$WORK/run" --device "$DEVICE" --stub-site "$STUB_NUMPY"

CONFIG=${CONFIG:-}
if [ "${TINY:-0}" = 1 ]; then
  CHECKPOINT=(--tiny)
else
  if [ -z "$CONFIG" ]; then
    for c in "$ROOT/shared/configs/flux2-klein-4b.json" "$ROOT/../shared/configs/flux2-klein-4b.json"; do
      if [ -f "$c" ]; then CONFIG=$c; break; fi
    done
  fi
  if [ -z "$CONFIG" ] || [ ! -f "$CONFIG" ]; then
    echo "error: no flux2-klein-4b.json in shared/configs or ../shared/configs (or set CONFIG)" >&2
    exit 2
  fi
  CKPT=$WORK/checkpoint
  if [ ! -f "$CKPT/model_index.json" ]; then
    stamp "random bf16 checkpoint of $CONFIG"
    "$PY" -m flux2_klein.cli tiny --config "$CONFIG" --out "$CKPT"
  fi
  du -sh "$CKPT"
  CHECKPOINT=(--checkpoint "$CKPT")
fi

stamp "benchmark: diffusers, then Triton"
"$PY" "$ROOT/bench/gpu_bench.py" all "${CHECKPOINT[@]}" --work "$WORK/run" --device "$DEVICE" \
  --size "${SIZE:-1024x1024}" --requests "${REQUESTS:-8}" --concurrency "${CONCURRENCY:-4}" \
  --concurrent-requests "${CONCURRENT_REQUESTS:-16}" --warmup "${WARMUP:-2}" --ready-timeout 300 \
  --stub-site "$STUB_NUMPY" --report-dir "$REPORT" ${COMPILE:+--compile "$COMPILE"}
stamp "done; report in $REPORT"
