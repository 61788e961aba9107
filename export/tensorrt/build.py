"""Building TensorRT engines (`flux2-klein export engines`, `build --runtime tensorrt`) from the exported
graphs, declared, not scripted.

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
  activation memory) per profile in each Triton instance, sized for its own profile only when the
  tensorrt_plan config sets execution_context_allocation_strategy ON_PROFILE_CHANGE.

Targets: on a GPU machine the target is the present GPU. TensorRT-RTX builds without one for a named
compute capability: `FLUX2_KLEIN_TENSORRT_TARGET` (or `target=`) names what a CPU cannot detect, and
`FLUX2_KLEIN_TENSORRT=tensorrt_rtx` picks that builder; this is how the tests run this very code on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from ...files import file_sha256
from ...progress import step
from ...specs import NetworkSpec
from ...target import Target
from .library import BuildError, flavour_of, import_trt, parse

log = logging.getLogger(__name__)

DEFAULT_OPT_LEVEL = 3
WORKSPACE_BYTES = 16 << 30  # a cap, not a reservation: TensorRT takes what a tactic needs up to this
TARGET_ENV = "FLUX2_KLEIN_TENSORRT_TARGET"
# Highest ONNX opset each builder's parser takes: (flavour, first version with it, opset). onnx-tensorrt's
# docs/operators.md lists 20 for TensorRT 10.0-10.1 and 24 for 10.15; 22 for 10.13 (Triton 25.10's) is
# NVIDIA's support matrix, confirmed on the GPU by bench/h100_tensorrt.sh; TensorRT-RTX 1.7 builds our
# opset-22 graphs in the tests.
PARSER_OPSETS = (("tensorrt", (10, 0), 20), ("tensorrt", (10, 13), 22), ("tensorrt", (10, 15), 24),
                 ("tensorrt_rtx", (1, 0), 22))


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


def source_hash(onnx_path: Path) -> str:
    """The graph and its external weights: a new export with other weights must change this."""
    h = hashlib.sha256()
    for f in sorted(Path(onnx_path).parent.glob(Path(onnx_path).name + "*")):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def resolve_trt(trt=None):
    if trt is not None:
        return trt
    try:
        return import_trt()
    except ImportError as e:
        raise BuildError(f"tensorrt: not installed ({e}); engines are built on a GPU machine with TensorRT "
                         "(the NGC Triton container has it)") from None


def parse_target(text: str, trt=None) -> Target:
    """`gpu=NAME,compute_capability=M.m[,tensorrt=VERSION]` (tensorrt defaults to the builder's)."""
    fields = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("gpu", "compute_capability", "tensorrt"):
            raise BuildError(f"{TARGET_ENV}: {part!r} is not gpu=..., compute_capability=... or tensorrt=...")
        fields[key.strip()] = value.strip()
    missing = [k for k in ("gpu", "compute_capability") if not fields.get(k)]
    if missing:
        raise BuildError(f"{TARGET_ENV}: {', '.join(missing)} missing in {text!r}; e.g. "
                         "gpu=NVIDIA GeForce RTX 4090,compute_capability=8.9")
    if "tensorrt" not in fields:
        fields["tensorrt"] = str(resolve_trt(trt).__version__)
    return Target(**fields)


def check_target(trt, target: Target) -> None:
    """The builder can make an engine for `target`; BuildError names the field that cannot be met."""
    if target.tensorrt != str(trt.__version__):
        raise BuildError(f"target tensorrt: {target.tensorrt}, but the builder is {trt.__name__} {trt.__version__}; "
                         "an engine loads only in the TensorRT that built it")
    if not re.fullmatch(r"\d+\.\d+", target.compute_capability):
        raise BuildError(f"target compute_capability: {target.compute_capability!r}, expected MAJOR.MINOR (e.g. 9.0)")
    if flavour_of(trt) == "tensorrt_rtx" and _rtx_capability(trt, target) is None:
        allowed = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
        raise BuildError(f"target compute_capability: {target.compute_capability} is not one TensorRT-RTX "
                         f"{trt.__version__} builds for; allowed: {', '.join(allowed)}")


def _rtx_capability(trt, target: Target):
    return trt.ComputeCapability.__members__.get("SM" + target.compute_capability.replace(".", ""))


def current_target(trt=None) -> Target:
    """$FLUX2_KLEIN_TENSORRT_TARGET when set, else the present GPU; raises BuildError naming what is missing."""
    trt = resolve_trt(trt)
    if os.environ.get(TARGET_ENV):
        target = parse_target(os.environ[TARGET_ENV], trt)
        check_target(trt, target)
        return target
    try:
        import torch
    except ImportError:
        raise BuildError("torch: needed to identify the GPU") from None
    if not torch.cuda.is_available():
        raise BuildError("gpu: no CUDA device visible; TensorRT engines are built on the GPU they serve "
                         f"(TensorRT-RTX can build for a named one: {TARGET_ENV})")
    major, minor = torch.cuda.get_device_capability(0)
    return Target(str(trt.__version__), torch.cuda.get_device_name(0), f"{major}.{minor}")


def parser_max_opset(flavour: str, version: str) -> int | None:
    """The highest opset `flavour` `version` parses, per PARSER_OPSETS; None when older than all listed."""
    v = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    known = [opset for f, first, opset in PARSER_OPSETS if f == flavour and v >= first]
    return max(known, default=None)


def expected_metadata(plan: EnginePlan, target: Target, onnx_hash: str | None = None,
                      builder: str = "tensorrt") -> dict:
    return {
        "network": plan.spec.name,
        "precision": plan.precision,
        "builder": builder,
        "tensorrt": target.tensorrt,
        "gpu": target.gpu,
        "compute_capability": target.compute_capability,
        "profiles": plan.profiles(),
        "opt_level": plan.opt_level,
        "onnx_sha256": onnx_hash or source_hash(plan.onnx_path),
    }


KEYS_THAT_MATTER = ("network", "precision", "builder", "tensorrt", "gpu", "compute_capability", "profiles",
                    "opt_level", "onnx_sha256")


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


def _check_opset(trt, plan: EnginePlan) -> None:
    meta = plan.onnx_path.parent / "model.json"  # written by the export beside every graph
    opset = json.loads(meta.read_text()).get("opset") if meta.is_file() else None
    limit = parser_max_opset(flavour_of(trt), str(trt.__version__))
    if opset is not None and limit is not None and opset > limit:
        raise BuildError(f"{plan.onnx_path}: opset {opset}, but {trt.__name__} {trt.__version__} parses up to "
                         f"{limit}; export for this TensorRT")


def serialize(trt, plan: EnginePlan, target: Target | None, logger=None):
    """The one TensorRT build: parse, configure from the plan, build. Returns (serialized engine, serialized
    timing cache or None). `target` None builds for the builder's own default (the present GPU)."""
    logger = logger or trt.Logger(trt.Logger.WARNING)
    _check_opset(trt, plan)
    with step(f"{plan.spec.name}: parse {plan.onnx_path}"):
        builder, network, _parser = parse(trt, plan.onnx_path, logger)
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(plan.spec.input_names):
        raise BuildError(f"{plan.onnx_path}: graph inputs {sorted(names)} differ from the spec's "
                         f"{sorted(plan.spec.input_names)}")
    config = builder.create_builder_config()
    config.builder_optimization_level = plan.opt_level
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    # Layer details (kernels, precisions, fusions) in the engine for its inspector (inspect.py);
    # no cost when running.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if target is not None and flavour_of(trt) == "tensorrt_rtx":
        config.num_compute_capabilities = 1
        config.set_compute_capability(_rtx_capability(trt, target), 0)
    cache = None
    # TensorRT-RTX picks kernels when the engine loads, not when it builds: it has no timing cache.
    if plan.timing_cache is not None and flavour_of(trt) == "tensorrt":
        data = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            # Written by another TensorRT or GPU: a cache only saves time, so start a fresh one.
            log.warning("%s: TensorRT refused the timing cache; starting a new one", plan.timing_cache)
            cache = config.create_timing_cache(b"")
            if not config.set_timing_cache(cache, ignore_mismatch=False):
                raise BuildError(f"{plan.timing_cache}: TensorRT refuses even an empty timing cache")
    for profile in plan.spec.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in plan.spec.profile_shapes(profile).items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    with step(f"{plan.spec.name}: build ({plan.precision}, level {plan.opt_level}, "
              f"{len(plan.spec.profiles)} profile(s))"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{plan.onnx_path}: TensorRT could not build an engine for profiles "
                         f"{[p.name for p in plan.spec.profiles]} (see its log above)")
    # Serialized while its builder config lives: the cache object does not outlive it safely.
    return serialized, (cache.serialize() if cache is not None else None)


def _write(path: Path, data) -> None:
    """Whole or not at all: a temporary file renamed into place. `data` goes through the buffer
    protocol, so an engine of many GB is never copied into a second Python object."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_engine(plan: EnginePlan, trt=None, target: Target | None = None, force: bool = False) -> Path:
    """Build `plan` unless a fresh engine is already there; returns the engine path."""
    trt = resolve_trt(trt)
    target = target or current_target(trt)
    check_target(trt, target)
    expected = expected_metadata(plan, target, builder=flavour_of(trt))
    reason = "rebuild asked" if force else check_engine(plan, expected)
    if reason is None:
        log.info("%s: engine is fresh, reusing %s", plan.spec.name, plan.engine_path)
        return plan.engine_path
    log.info("%s: building engine for %s (%s)", plan.spec.name, target.gpu, reason)
    serialized, cache = serialize(trt, plan, target)
    plan.engine_path.parent.mkdir(parents=True, exist_ok=True)
    # Metadata last, after the engine is complete: an engine without one is treated as stale.
    plan.metadata_path.unlink(missing_ok=True)
    _write(plan.engine_path, serialized)
    del serialized
    if cache is not None:
        _write(plan.timing_cache, cache)
    plan.metadata_path.write_text(json.dumps({**expected, "engine_sha256": file_sha256(plan.engine_path)}, indent=1))
    return plan.engine_path
