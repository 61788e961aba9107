"""`flux2-klein build --runtime tensorrt`: ONNX (BF16, the DiT in FP8) -> TensorRT engines -> a
repository of `tensorrt_plan` leaves. `--dry-run` prints the whole plan, TensorRT or not.

Precisions: the DiT in FP8 (or BF16 with --precision bf16); the text encoder and the VAE in BF16
(FP8 for the text encoder is not measured yet; the VAE is sensitive and cheap).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from ...checkpoint import Checkpoint
from ...contract import PRECISIONS
from ...progress import log, step
from ...specs import NETWORKS, NetworkSpec, network_specs
from ...triton_config import Instances, plan_config
from ..graph_checks import activation_estimate, instance_estimate
from .build import (
    DEFAULT_OPT_LEVEL, EnginePlan, build_engine, check_engine, current_target, expected_metadata, resolve_trt,
)
from .library import flavour_of


def default_work(repo: str | Path) -> Path:
    """The build's work folder unless one is given: REPO.work beside the repository (Triton takes every folder
    of a repository for a model), for the ONNX graphs, the FP8 calibration and the timing cache."""
    return Path(str(Path(repo)) + ".work")


def network_precision(network: str, precision: str) -> str:
    return "fp8" if network == "transformer" and precision == "fp8" else "bf16"


def engine_plans(ckpt: Checkpoint, repo: Path, work: Path, precision: str, opt_level: int | None = None):
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
                  f"  engine: {plan.engine_path} (+ {plan.metadata_path.name}: TensorRT, GPU, profiles, graph hash; "
                  f"kept in {kept_plan(plan, work).engine_path.parent} too, so a failed build resumes)"]
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
    from ..fp8 import export_fp8
    from ..onnx_export import export_network

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


def kept_plan(plan: EnginePlan, work: Path) -> EnginePlan:
    """The same plan with its engine in `work/engines/<network>/` (the persistent work folder), where a
    finished engine outlives a repository folder that a failed or killed build leaves to be removed."""
    return dataclasses.replace(plan, engine_path=work / "engines" / plan.spec.name / plan.engine_path.name)


def _place(src: EnginePlan, dst: EnginePlan) -> None:
    """Engine and metadata from `src` to `dst`: a hard link where both lie on one filesystem (engines are
    GBs; the container keeps work and repositories on one cache volume), else a copy; metadata last, so an
    interrupted copy reads as stale."""
    dst.engine_path.parent.mkdir(parents=True, exist_ok=True)
    dst.metadata_path.unlink(missing_ok=True)
    tmp = dst.engine_path.with_name(dst.engine_path.name + ".partial")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src.engine_path, tmp)
    except OSError:
        shutil.copyfile(src.engine_path, tmp)
    os.replace(tmp, dst.engine_path)
    shutil.copyfile(src.metadata_path, dst.metadata_path)


def tensorrt_leaf_writer(work: Path, precision: str, opt_level: int | None = None, trt=None, target=None):
    """A LEAF_WRITERS entry: build (or reuse) the engine and write its tensorrt_plan config. `trt` and
    `target` default to $FLUX2_KLEIN_TENSORRT and $FLUX2_KLEIN_TENSORRT_TARGET, else the present GPU.

    Every finished engine is kept in the work folder too (`kept_plan`): the container builds a repository in
    a temporary folder that a failed or killed build leaves behind to be removed, and the next start then
    builds only the engines still missing. A fresh engine already in the repository is kept as it is."""
    def write(repo: Path, ckpt: Checkpoint, spec: NetworkSpec, instances: Instances, **_) -> dict:
        (plan,) = [p for p in engine_plans(ckpt, repo, work, precision, opt_level) if p.spec.name == spec.name]
        kept = kept_plan(plan, work)
        with step(f"{spec.name}: engine"):
            trt_ = resolve_trt(trt)
            target_ = target or current_target(trt_)
            expected = expected_metadata(plan, target_, builder=flavour_of(trt_))
            if check_engine(plan, expected) is None:
                log.info("%s: engine in the repository is fresh, reusing %s", spec.name, plan.engine_path)
                if check_engine(kept, expected) is not None:
                    _place(plan, kept)
            else:
                build_engine(kept, trt=trt_, target=target_)  # reuses a fresh one a failed build left in work
                _place(kept, plan)
        from ...repository import write_model

        write_model(repo, spec.name, plan_config(spec, instances))
        return json.loads(plan.metadata_path.read_text())

    return write
