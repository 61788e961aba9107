"""`flux2-klein build --runtime tensorrt`: ONNX (BF16, the DiT in FP8) -> TensorRT engines -> a
repository of `tensorrt_plan` leaves. `--dry-run` prints the whole plan, TensorRT or not.

Precisions: the DiT in FP8 (or BF16 with --precision bf16); the text encoder and the VAE in BF16
(FP8 for the text encoder is not measured yet; the VAE is sensitive and cheap).
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import Checkpoint
from .progress import log, step
from .specs import NETWORKS, NetworkSpec, network_specs
from .triton_config import Instances, plan_config

PRECISIONS = ("fp8", "bf16")


def network_precision(network: str, precision: str) -> str:
    return "fp8" if network == "transformer" and precision == "fp8" else "bf16"


def engine_plans(ckpt: Checkpoint, repo: Path, work: Path, precision: str, opt_level: int | None = None):
    from .export.engines import DEFAULT_OPT_LEVEL, EnginePlan

    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    specs = network_specs(ckpt)
    return [
        EnginePlan(spec=specs[name], onnx_path=work / network_precision(name, precision) / name / "model.onnx",
                   engine_path=repo / name / "1" / "model.plan", precision=network_precision(name, precision),
                   opt_level=opt_level or DEFAULT_OPT_LEVEL, timing_cache=work / "timing.cache")
        for name in NETWORKS
    ]


def describe_plan(ckpt: Checkpoint, repo: Path, work: Path, precision: str, opt_level: int | None = None) -> str:
    lines = [f"checkpoint: {ckpt.path}", f"repository: {repo}", f"work folder (ONNX, timing cache): {work}", ""]
    for plan in engine_plans(ckpt, repo, work, precision, opt_level):
        export = ("export fp8 (ModelOpt calibration on export/calibration_prompts.txt, Q/DQ)"
                  if plan.precision == "fp8" else "export onnx --dtype bf16")
        lines += [f"[{plan.spec.name}] {plan.precision}: {export}", f"  graph:  {plan.onnx_path}",
                  f"  engine: {plan.engine_path} (+ {plan.metadata_path.name}: TensorRT, GPU, profiles, graph hash)"]
        for profile in plan.profiles():
            shapes = "; ".join(f"{n} {' / '.join('x'.join(map(str, s)) for s in mm)}" for n, mm in profile["shapes"].items())
            lines.append(f"  profile {profile['name']} (min / opt / max): {shapes}")
        lines += [f"  {plan.trtexec()}", ""]
    return "\n".join(lines)


def export_graphs(ckpt: Checkpoint, work: Path, precision: str) -> None:
    """The ONNX graphs the plans read: BF16 for all, plus the FP8 DiT."""
    from .export.fp8 import export_fp8
    from .export.onnx_export import export_network

    specs = network_specs(ckpt)
    for name in NETWORKS:
        target = work / network_precision(name, precision) / name
        if (target / "model.json").is_file():
            log.info("%s: reusing %s", name, target)
            continue
        if network_precision(name, precision) == "fp8":
            export_fp8(ckpt.path, work / "fp8", dtype="bf16")
        else:
            export_network(ckpt, specs[name], target, "bf16")


def tensorrt_leaf_writer(work: Path, precision: str, opt_level: int | None = None, trt=None):
    """A LEAF_WRITERS entry: build (or reuse) the engine and write its tensorrt_plan config."""
    from .export.engines import build_engine

    def write(repo: Path, ckpt: Checkpoint, spec: NetworkSpec, instances: Instances, **_) -> dict:
        (plan,) = [p for p in engine_plans(ckpt, repo, work, precision, opt_level) if p.spec.name == spec.name]
        with step(f"{spec.name}: engine"):
            build_engine(plan, trt=trt)
        (repo / spec.name / "config.pbtxt").write_text(plan_config(spec, instances))
        return json.loads(plan.metadata_path.read_text())

    return write
