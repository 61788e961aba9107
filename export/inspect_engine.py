"""`python -m flux2_klein.export.inspect_engine ENGINE...`: what TensorRT made of each engine, from its
own inspector (engines are built with detailed profiling verbosity): every layer as JSON, and a summary
line that counts the GEMMs running in FP8 and the fused attention kernels. Needs the GPU the engine was
built for (deserializing an engine does); bench/h100_tensorrt.sh runs it on the H100.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .trt_build import import_trt

# Kernel and layer names TensorRT gives fused attention (its MHA and flash-attention kernels).
ATTENTION = re.compile(r"mha|fmha|flash|attention|_attn", re.I)
GEMM = re.compile(r"gemm|matmul|matrixmultiply", re.I)
FP8 = re.compile(r"fp8|float8|e4m3", re.I)


def summarize(layers: list) -> dict:
    """Counts over the inspector's layers (dicts, or bare names at lower verbosity)."""
    texts = [json.dumps(layer) for layer in layers]
    return {
        "layers": len(layers),
        "fp8_gemms": sum(1 for t in texts if GEMM.search(t) and FP8.search(t)),
        "gemms": sum(1 for t in texts if GEMM.search(t)),
        "fused_attention": sum(1 for t in texts if ATTENTION.search(t)),
    }


def inspect(engine_path: Path, trt=None) -> dict:
    trt = trt or import_trt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"{engine_path}: TensorRT could not deserialize it (another version or GPU?)")
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return {"engine": str(engine_path), "profiles": engine.num_optimization_profiles,
            "device_memory_bytes": int(getattr(engine, "device_memory_size_v2", engine.device_memory_size)),
            "summary": summarize(info.get("Layers", [])), "layers": info.get("Layers", [])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flux2_klein.export.inspect_engine", description=__doc__)
    p.add_argument("engines", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="folder for <network>.layers.json")
    args = p.parse_args(argv)
    for path in args.engines:
        result = inspect(path)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{path.parent.parent.name}.layers.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({"engine": str(path), "profiles": result["profiles"],
                          "device_memory_gib": round(result["device_memory_bytes"] / 2**30, 2), **result["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
