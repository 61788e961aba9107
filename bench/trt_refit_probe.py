"""What a refittable DiT engine would cost, measured where TensorRT runs here: TensorRT-RTX on a CPU.

Per-request LoRAs on TensorRT would need refittable engines (BuilderFlag.REFIT) and a refit of every
LoRA-touched weight whenever the next batch's set differs (lora_library.py explains why the repository refuses a
library on tensorrt instead). This probe builds the tiny checkpoint's DiT graph twice with the production
builder's settings (export/tensorrt/library.parse; strongly typed, the spec's profiles), with and without REFIT,
and reports build time and engine size; then it tries the refit itself (Runtime + Refitter), which needs a GPU:
on a CPU the attempt's error is the result. Run:

    python bench/trt_refit_probe.py --onnx DIR/transformer/model.onnx --checkpoint CKPT --out REPORT.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _build(trt, onnx_path: Path, spec, refit: bool) -> tuple[bytes, float]:
    from flux2_klein.export.tensorrt.library import parse

    logger = trt.Logger(trt.Logger.ERROR)
    builder, network, _parser = parse(trt, onnx_path, logger)
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.SM89, 0)  # a named FP8-capable target, as tests/test_trt_rtx.py
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    for profile in spec.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.profile_shapes(profile).items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: no engine (refit={refit})")
    return bytes(serialized), seconds


def main(argv=None) -> int:
    from flux2_klein.checkpoint import load_checkpoint
    from flux2_klein.export.tensorrt.library import import_trt
    from flux2_klein.specs import network_specs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, type=Path, help="the DiT graph (export onnx's transformer/model.onnx)")
    ap.add_argument("--checkpoint", required=True, help="the checkpoint it was exported from (for its profiles)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    trt = import_trt("tensorrt_rtx")
    spec = network_specs(load_checkpoint(args.checkpoint))["transformer"]
    rows, engines, failures = {False: [], True: []}, {}, {}
    for _ in range(args.repeats):  # interleaved, to cancel drift on a shared machine
        for refit in (False, True):
            try:
                engine, seconds = _build(trt, args.onnx, spec, refit)
            except RuntimeError as e:  # recorded: which build a CPU cannot make is a result too
                failures["refit" if refit else "plain"] = str(e)
                continue
            rows[refit].append(seconds)
            engines[refit] = engine
    result = {"tensorrt": f"{trt.__name__} {trt.__version__}", "onnx": str(args.onnx),
              "build_s": {"plain": rows[False], "refit": rows[True]},
              "engine_bytes": {k: len(engines[v]) for k, v in (("plain", False), ("refit", True)) if v in engines},
              "build_failures": failures}
    try:  # the refit itself: a deserialized engine and a Refitter need a CUDA device
        if True not in engines:
            raise RuntimeError("no refittable engine was built")
        runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
        engine = runtime.deserialize_cuda_engine(engines[True])
        if engine is None:
            raise RuntimeError("deserialize_cuda_engine returned None")
        refitter = trt.Refitter(engine, trt.Logger(trt.Logger.ERROR))
        result["refittable_weights"] = len(refitter.get_all_weights())
    except Exception as e:  # noqa: BLE001 - on a CPU this is the expected answer, recorded as such
        result["refit"] = f"not measurable here: {type(e).__name__}: {e}"
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
