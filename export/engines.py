"""`flux2-klein export engines`: TensorRT engines from the exported graphs, declared, not scripted.

An engine is described by an `EnginePlan` (graph, precision, profiles from the network's spec, builder
settings); `build_engine` turns a plan into a serialized engine with the TensorRT Python API, and writes
beside it a metadata file that says what it was built from and for. `check_engine` compares that file
with the present machine and graph: a stale engine (another TensorRT, another GPU, another graph, other
profiles) or a foreign one is rebuilt, never loaded.

Builder choices, and why:
* Strongly typed networks: the graph's own casts and Q/DQ decide every tensor's type (BF16 compute,
  FP8 GEMMs where the FP8 export put Q/DQ); the builder does not second-guess precision.
* Optimization level 3 (TensorRT's default) unless asked: levels 4-5 try more tactics for a few percent
  at two to three times the build time and more build memory, which a first container start pays for.
* A timing cache shared by all engines of a machine: rebuilding after a checkpoint change reuses tactic
  timings instead of measuring every kernel again.
* Several narrow profiles for the DiT rather than one wide one (specs.transformer_spec): TensorRT tunes
  kernels at a profile's opt shape and must pick ones valid over its whole range, and users report
  markedly slower engines over wide dynamic ranges; text-to-image, the common case, gets a profile of
  4042..4150 tokens tuned at 4096. The cost is build time per profile and one execution context (its
  activation memory) per profile in each Triton instance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..progress import step
from ..specs import NetworkSpec
from .trt_build import BuildError, import_trt, parse

log = logging.getLogger(__name__)

DEFAULT_OPT_LEVEL = 3
WORKSPACE_BYTES = 16 << 30  # a cap, not a reservation: TensorRT takes what a tactic needs up to this


@dataclass(frozen=True)
class EnginePlan:
    spec: NetworkSpec
    onnx_path: Path
    engine_path: Path
    precision: str  # "fp8" (BF16 + FP8 GEMMs) or "bf16"
    opt_level: int = DEFAULT_OPT_LEVEL
    timing_cache: Path | None = None

    @property
    def metadata_path(self) -> Path:
        return self.engine_path.with_suffix(".json")

    def profiles(self) -> list[dict]:
        return [{"name": p.name, "shapes": {k: [list(s) for s in v] for k, v in self.spec.profile_shapes(p).items()}}
                for p in self.spec.profiles]

    def trtexec(self) -> str:
        """The equivalent trtexec command line, for people who build by hand or compare."""
        args = ["trtexec", f"--onnx={self.onnx_path}", f"--saveEngine={self.engine_path}", "--stronglyTyped",
                f"--builderOptimizationLevel={self.opt_level}", f"--memPoolSize=workspace:{WORKSPACE_BYTES >> 20}M"]
        if self.timing_cache:
            args.append(f"--timingCacheFile={self.timing_cache}")
        for profile in self.spec.profiles:  # one --minShapes/--optShapes/--maxShapes triple per profile
            shapes = self.spec.profile_shapes(profile)
            for flag, i in (("minShapes", 0), ("optShapes", 1), ("maxShapes", 2)):
                args.append(f"--{flag}=" + ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shapes.items()))
        return " ".join(shlex.quote(a) for a in args)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def source_hash(onnx_path: Path) -> str:
    """The graph and its external weights: a new export with other weights must change this."""
    h = hashlib.sha256()
    for f in sorted(Path(onnx_path).parent.glob(Path(onnx_path).name + "*")):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Target:
    """What an engine is built for: the TensorRT and the GPU it runs on."""

    tensorrt: str
    gpu: str
    compute_capability: str


def current_target(trt=None) -> Target:
    """The present machine; raises BuildError naming what is missing."""
    if trt is None:
        try:
            trt = import_trt("tensorrt")
        except ImportError as e:
            raise BuildError(f"tensorrt: not installed ({e}); engines are built on a GPU machine with TensorRT "
                             "(the NGC Triton container has it)") from None
    try:
        import torch

        if not torch.cuda.is_available():
            raise BuildError("gpu: no CUDA device visible; TensorRT engines are built on the GPU they serve")
        major, minor = torch.cuda.get_device_capability(0)
        return Target(trt.__version__, torch.cuda.get_device_name(0), f"{major}.{minor}")
    except ImportError:
        raise BuildError("torch: needed to identify the GPU") from None


def expected_metadata(plan: EnginePlan, target: Target, onnx_hash: str | None = None) -> dict:
    return {
        "network": plan.spec.name,
        "precision": plan.precision,
        "tensorrt": target.tensorrt,
        "gpu": target.gpu,
        "compute_capability": target.compute_capability,
        "profiles": plan.profiles(),
        "opt_level": plan.opt_level,
        "onnx_sha256": onnx_hash or source_hash(plan.onnx_path),
    }


KEYS_THAT_MATTER = ("network", "precision", "tensorrt", "gpu", "compute_capability", "profiles", "opt_level",
                    "onnx_sha256")


def check_engine(plan: EnginePlan, expected: dict) -> str | None:
    """None when the engine on disk was built from this graph for this machine; else why it is stale."""
    if not plan.engine_path.is_file():
        return "no engine yet"
    if not plan.metadata_path.is_file():
        return "no metadata beside the engine (foreign or interrupted build)"
    try:
        found = json.loads(plan.metadata_path.read_text())
    except json.JSONDecodeError:
        return "unreadable metadata"
    for key in KEYS_THAT_MATTER:
        if found.get(key) != expected.get(key):
            return f"{key} changed: {found.get(key)!r} -> {expected.get(key)!r}"
    if found.get("engine_sha256") != file_sha256(plan.engine_path):
        return "the engine file does not match its metadata"
    return None


def build_engine(plan: EnginePlan, trt=None, target: Target | None = None, force: bool = False) -> Path:
    """Build `plan` unless a fresh engine is already there; returns the engine path."""
    trt = trt or import_trt("tensorrt")
    target = target or current_target(trt)
    expected = expected_metadata(plan, target)
    reason = "rebuild asked" if force else check_engine(plan, expected)
    if reason is None:
        log.info("%s: engine is fresh, reusing %s", plan.spec.name, plan.engine_path)
        return plan.engine_path
    log.info("%s: building engine (%s)", plan.spec.name, reason)
    logger = trt.Logger(trt.Logger.WARNING)
    with step(f"{plan.spec.name}: parse {plan.onnx_path}"):
        builder, network, _parser = parse(trt, plan.onnx_path, logger)
    config = builder.create_builder_config()
    config.builder_optimization_level = plan.opt_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    cache = None
    if plan.timing_cache is not None:
        data = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    for profile in plan.spec.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in plan.spec.profile_shapes(profile).items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    with step(f"{plan.spec.name}: build ({plan.precision}, level {plan.opt_level}, "
              f"{len(plan.spec.profiles)} profile(s))"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{plan.spec.name}: TensorRT could not build the engine (see its log above)")
    plan.engine_path.parent.mkdir(parents=True, exist_ok=True)
    # Metadata last, after the engine is complete: an interrupted build leaves an engine without one,
    # which check_engine treats as stale.
    plan.metadata_path.unlink(missing_ok=True)
    plan.engine_path.write_bytes(bytes(serialized))
    if cache is not None:
        plan.timing_cache.write_bytes(bytes(cache.serialize()))
    plan.metadata_path.write_text(json.dumps({**expected, "engine_sha256": file_sha256(plan.engine_path)}, indent=1))
    return plan.engine_path
