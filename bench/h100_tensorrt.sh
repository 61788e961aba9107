#!/usr/bin/env bash
# The TensorRT path on a user's H100, inside the image docker/Dockerfile builds (NGC Triton 25.10): what
# the CPU tests cannot show. It checks TensorRT's Builder and ONNX parser (and that the wheel and the loaded
# libnvinfer are one version), builds the four engines the way the container does (`flux2-klein build
# --runtime tensorrt`), counts each engine's FP8 GEMMs and fused attention layers from TensorRT's own
# inspector fields (export/tensorrt/inspect.py) with its device memory, serves them with Triton and runs
# `flux2-klein bench`. One command, run through NVIDIA's entrypoint (its CUDA forward-compatibility set-up on
# hosts older than R580), as the image's user 10001, writing only under the cache volume (/cache, that user's):
#
#   docker run --rm --gpus 1 --shm-size 2g -v "$PWD":/src:ro -v flux2-h100:/cache \
#       -v /path/to/FLUX.2-klein-4B:/models/checkpoint:ro --entrypoint /opt/nvidia/nvidia_entrypoint.sh \
#       flux2-klein-triton:0.1.0 bash /src/bench/h100_tensorrt.sh
#
# Environment: CKPT (default /models/checkpoint; without one, random bf16 weights of CONFIG, default
# the package's flux2_klein/configs/flux2-klein-4b.json), WORK (default $HOME/h100, i.e. /cache/h100: graphs,
# calibration, engines; a rerun resumes from what is finished), PRECISION (fp8 | bf16, default fp8),
# CALIBRATION_PROMPTS (default 300: every shipped prompt; fewer for a quicker, less faithful FP8 run),
# CONCURRENCY (default 1:4).
# Expect: the check line "Builder and OnnxParser work"; the transformer's line with fp8_gemms > 0 and
# fused_attention > 0 (none fused would mean attention's S^2 scores in memory: tens of GB at four
# references); $WORK/report/summary.md: per engine its FP8 GEMMs, fused attention layers, device memory and
# build time, then Triton's latency per concurrency (bench/report.md beside it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-$HOME/h100}
REPORT=$WORK/report
PRECISION=${PRECISION:-fp8}
mkdir -p "$REPORT"
cd "$WORK"
START=$SECONDS
stamp() { echo "[$((SECONDS - START)) s] $*"; }

stamp "machine and TensorRT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$REPORT/gpu.txt"
python3 -m flux2_klein.export.tensorrt --check | tee "$REPORT/tensorrt.txt"

CKPT=${CKPT:-/models/checkpoint}
if [ ! -f "$CKPT/model_index.json" ]; then
  CONFIG=${CONFIG:-$ROOT/flux2_klein/configs/flux2-klein-4b.json}
  CKPT=$WORK/checkpoint
  if [ ! -f "$CKPT/model_index.json" ]; then
    stamp "no checkpoint mounted: random bf16 weights of $CONFIG"
    flux2-klein tiny --config "$CONFIG" --out "$CKPT"
  fi
fi

REPO=$WORK/repository
if [ "$PRECISION" = fp8 ] && [ ! -f "$WORK/work/fp8/transformer/model.json" ]; then
  stamp "FP8 calibration and export (${CALIBRATION_PROMPTS:-300} prompts)"
  flux2-klein export fp8 --checkpoint "$CKPT" --out "$WORK/work/fp8" --limit "${CALIBRATION_PROMPTS:-300}"
fi
stamp "engines and repository (fresh engines are reused)"
flux2-klein build --checkpoint "$CKPT" --out "$REPO" --runtime tensorrt --precision "$PRECISION" --work "$WORK/work" \
  2>&1 | tee "$REPORT/build.log"

stamp "layer information: FP8 GEMMs and fused attention"
python3 -m flux2_klein.export.tensorrt.inspect "$REPO"/*/1/model.plan --out "$REPORT/layers" | tee "$REPORT/layers.txt"

stamp "serve and bench"
flux2-klein serve --repository "$REPO" --http-port 8003 --grpc-port 8001 --metrics-port 8002 \
  > "$REPORT/tritonserver.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  if curl -sf localhost:8003/v2/health/ready > /dev/null; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then tail -50 "$REPORT/tritonserver.log"; exit 1; fi
  sleep 1
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader | tee "$REPORT/gpu_memory_served.txt"
flux2-klein bench --url localhost:8001 --concurrency "${CONCURRENCY:-1:4}" --repository "$REPO" --no-direct \
  --out "$REPORT/bench"
nvidia-smi --query-gpu=memory.used --format=csv,noheader | tee "$REPORT/gpu_memory_after_bench.txt"
python3 -m flux2_klein.export.tensorrt.inspect --summary "$REPORT" | tee "$REPORT/summary.md"
stamp "done; report in $REPORT"
