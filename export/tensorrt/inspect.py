"""`python -m flux2_klein.export.tensorrt.inspect ENGINE... [--out DIR]`: what TensorRT made of each engine,
from its own inspector (engines are built with detailed profiling verbosity): every layer as JSON, and a
summary that counts the GEMMs running in FP8 and the fused attention kernels, with the engine's device
memory. `--summary REPORT` writes bench/h100_tensorrt.sh's summary.md from what it left in REPORT.
Deserializing needs the GPU the engine was built for; bench/h100_tensorrt.sh runs it on the H100.

Layers are classified by TensorRT's own fields only, never by searching the whole layer record: its
"Name" and "Metadata" carry the ONNX node names ("/blocks.0/attn/MatMul", "scaled_dot_product_attention"),
so an unfused engine would otherwise report fusion. The fields, as NVIDIA/TensorRT's engine explorer reads
the inspector's JSON (tools/experimental/trt-engine-explorer/trex/layer.py and activations.py): "LayerType"
(the kind TensorRT built, e.g. "CaskGemmMatrixMultiply", "CaskFlashAttention", "MHA"), "TacticName" where
present (the kernel, e.g. "sm90_xmma_gemm_e4m3..."/"fmha_v2_flash_attention..."), and each of "Inputs" with
"Format/Datatype" ("Row major linear FP8 format", "Row major linear BFloat16 format").
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .library import import_trt

GEMM_TYPE = re.compile(r"gemm|matrixmultiply|matmul", re.I)
ATTENTION_TYPE = re.compile(r"mha|attention", re.I)  # TensorRT's fused MHA / flash-attention layer kinds
ATTENTION_TACTIC = re.compile(r"fmha|flash|mha_v2|_mha", re.I)
FP8 = re.compile(r"fp8|e4m3", re.I)


def _field(layer: dict, key: str) -> str:
    value = layer.get(key, "")
    return value if isinstance(value, str) else ""


def _formats(layer: dict, side: str) -> list[str]:
    return [_field(t, "Format/Datatype") for t in layer.get(side, []) if isinstance(t, dict)]


def classify(layer) -> dict:
    """One layer's kind from TensorRT's fields: gemm, fp8 (a GEMM reading FP8 data or running an e4m3
    kernel), fused attention. A bare name (lower verbosity) says nothing and counts as neither."""
    if not isinstance(layer, dict):
        return {"gemm": False, "fp8": False, "attention": False}
    kind, tactic = _field(layer, "LayerType"), _field(layer, "TacticName")
    attention = bool(ATTENTION_TYPE.search(kind) or ATTENTION_TACTIC.search(tactic))
    gemm = not attention and bool(GEMM_TYPE.search(kind) or GEMM_TYPE.search(tactic))
    fp8 = gemm and (bool(FP8.search(tactic)) or any(FP8.search(f) for f in _formats(layer, "Inputs")))
    return {"gemm": gemm, "fp8": fp8, "attention": attention}


def summarize(layers: list) -> dict:
    kinds = [classify(layer) for layer in layers]
    return {"layers": len(layers), "fp8_gemms": sum(k["fp8"] for k in kinds), "gemms": sum(k["gemm"] for k in kinds),
            "fused_attention": sum(k["attention"] for k in kinds)}


def inspect(engine_path: Path, trt=None) -> dict:
    trt = trt or import_trt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"{engine_path}: TensorRT could not deserialize it (another version or GPU?)")
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", [])
    return {"engine": str(engine_path), "profiles": engine.num_optimization_profiles,
            "device_memory_gib": round(int(getattr(engine, "device_memory_size_v2", None)
                                          or engine.device_memory_size) / 2**30, 2),
            "summary": summarize(layers), "layers": layers}


def build_times(log_text: str) -> dict[str, float]:
    """network -> seconds of its TensorRT build, from progress.step's "<network>: build (...): done in X s"."""
    return {m[1]: float(m[2]) for m in re.finditer(r"(\w+): build \([^)]*\)[^:]*: done in ([\d.]+) s", log_text)}


def summary_markdown(report: Path) -> str:
    """summary.md of bench/h100_tensorrt.sh's report folder: engines (layers/*.layers.json, build.log), then
    the bench's own report."""
    times = build_times((report / "build.log").read_text()) if (report / "build.log").is_file() else {}
    lines = ["| engine | profiles | GEMMs | FP8 GEMMs | fused attention | device memory | build |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for path in sorted((report / "layers").glob("*.layers.json")):
        r = json.loads(path.read_text())
        name, s = path.name.split(".")[0], r["summary"]
        build = f"{times[name]:.0f} s" if name in times else "reused"
        lines.append(f"| {name} | {r['profiles']} | {s['gemms']} | {s['fp8_gemms']} | {s['fused_attention']} | "
                     f"{r['device_memory_gib']} GiB | {build} |")
    bench = report / "bench" / "report.md"
    return "\n".join(["# TensorRT on this GPU", "", *lines, "",
                      bench.read_text() if bench.is_file() else "(no bench report)"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flux2_klein.export.tensorrt.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("engines", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=None, help="folder for <network>.layers.json")
    p.add_argument("--summary", type=Path, default=None, metavar="REPORT",
                   help="print summary.md of bench/h100_tensorrt.sh's report folder instead")
    args = p.parse_args(argv)
    if args.summary:
        print(summary_markdown(args.summary), end="")
        return 0
    if not args.engines:
        p.error("name at least one engine, or --summary REPORT")
    for path in args.engines:
        result = inspect(path)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{path.parent.parent.name}.layers.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({"engine": str(path), "profiles": result["profiles"],
                          "device_memory_gib": result["device_memory_gib"], **result["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
