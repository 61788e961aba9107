"""`flux2-klein build --runtime tensorrt`: ONNX (BF16, the DiT in FP8) -> TensorRT engines -> a
repository of `tensorrt_plan` leaves. `--dry-run` prints the whole plan, TensorRT or not.

Precisions: the DiT in FP8 (or BF16 with --precision bf16); the text encoder and the VAE in BF16
(FP8 for the text encoder is not measured yet; the VAE is sensitive and cheap).
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import Checkpoint
from .contract import PRECISIONS
from .export.graph_checks import activation_estimate, instance_estimate
from .progress import log, step
from .specs import NETWORKS, NetworkSpec, network_specs
from .triton_config import Instances, plan_config



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


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def describe_plan(ckpt: Checkpoint, repo: Path, work: Path, precision: str, opt_level: int | None = None) -> str:
    lines = [f"checkpoint: {ckpt.path}", f"repository: {repo}", f"work folder (ONNX graphs, FP8 calibration, timing cache; finished pieces are reused): {work}", ""]
    for plan in engine_plans(ckpt, repo, work, precision, opt_level):
        export = ("export fp8 (ModelOpt calibration on export/calibration_prompts.txt, Q/DQ)"
                  if plan.precision == "fp8" else "export onnx --dtype bf16")
        lines += [f"[{plan.spec.name}] {plan.precision}: {export}", f"  graph:  {plan.onnx_path}",
                  f"  engine: {plan.engine_path} (+ {plan.metadata_path.name}: TensorRT, GPU, profiles, graph hash)"]
        for profile, spec_profile in zip(plan.profiles(), plan.spec.profiles):
            shapes = "; ".join(f"{n} {' / '.join('x'.join(map(str, s)) for s in mm)}" for n, mm in profile["shapes"].items())
            est = activation_estimate(plan.spec, ckpt, spec_profile)
            lines.append(f"  profile {profile['name']} (min / opt / max): {shapes}")
            lines.append(f"    activations at max: {_gib(est.bytes)}"
                         + ("" if est.fused else " (attention counted unfused)")
                         + (f"; {_gib(est.activations + est.attention_scores)} if attention is not fused"
                            if est.fused else ""))
        lines += [f"  per Triton instance (one context per profile, ON_PROFILE_CHANGE): up to "
                  f"{_gib(instance_estimate(plan.spec, ckpt))} of activations", f"  {plan.trtexec()}", ""]
    return "\n".join(lines)


def export_graphs(ckpt: Checkpoint, work: Path, precision: str) -> None:
    """The ONNX graphs the plans read: BF16 for all, plus the FP8 DiT. Finished pieces in `work` are kept
    (an FP8 calibration too, in fp8/transformer/fp8_scales.json), so a failed build resumes; keep `work`
    on a persistent volume, keyed by checkpoint and code, for that to help."""
    from .export.fp8 import export_fp8
    from .export.onnx_export import export_network

    specs = network_specs(ckpt)
    for name in NETWORKS:
        target = work / network_precision(name, precision) / name
        if (target / "model.json").is_file():  # written last: the export finished
            log.info("%s: reusing %s", name, target)
            continue
        if network_precision(name, precision) == "fp8":
            export_fp8(ckpt.path, work / "fp8", dtype="bf16")
        else:
            export_network(ckpt, specs[name], target, "bf16")


def tensorrt_leaf_writer(work: Path, precision: str, opt_level: int | None = None, trt=None, target=None):
    """A LEAF_WRITERS entry: build (or reuse) the engine and write its tensorrt_plan config. `trt` and
    `target` default to $FLUX2_KLEIN_TENSORRT and $FLUX2_KLEIN_TENSORRT_TARGET, else the present GPU."""
    from .export.engines import build_engine

    def write(repo: Path, ckpt: Checkpoint, spec: NetworkSpec, instances: Instances, **_) -> dict:
        (plan,) = [p for p in engine_plans(ckpt, repo, work, precision, opt_level) if p.spec.name == spec.name]
        with step(f"{spec.name}: engine"):
            build_engine(plan, trt=trt, target=target)
        (repo / spec.name / "config.pbtxt").write_text(plan_config(spec, instances))
        return json.loads(plan.metadata_path.read_text())

    return write
