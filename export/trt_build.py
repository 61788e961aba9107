"""Build a TensorRT engine from an exported graph and its spec's optimization profiles.

Written against the API that TensorRT and TensorRT-RTX share (`tensorrt` / `tensorrt_rtx_bindings`):
production engines come from the first on the user's GPU machine; the tests build with the second on
a CPU, proving that every graph we export parses and builds under the profiles we ship.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from ..specs import NetworkSpec

log = logging.getLogger(__name__)

MODULES = ("tensorrt", "tensorrt_rtx_bindings")


def import_trt(name: str):
    """Import a TensorRT flavour by module name; ImportError says which and why."""
    if name not in MODULES:
        raise ValueError(f"tensorrt module: {name!r}, expected one of {', '.join(MODULES)}")
    return importlib.import_module(name)


class BuildError(RuntimeError):
    pass


def parse(trt, onnx_path: Path, logger=None):
    """Parse an ONNX file (external weights resolved beside it) into a strongly typed network."""
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        # Strongly typed: the graph's own casts decide precision, not the builder's heuristics.
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    return builder, network, parser


def build_serialized(trt, onnx_path: Path, spec: NetworkSpec, *, optimization_level: int | None = None):
    """Parse and build one engine holding every profile of `spec`; returns the serialized engine."""
    builder, network, _parser = parse(trt, onnx_path)
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    if names != set(spec.input_names):
        raise BuildError(f"{onnx_path}: graph inputs {sorted(names)} differ from the spec's {sorted(spec.input_names)}")
    config = builder.create_builder_config()
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    for profile in spec.profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.profile_shapes(profile).items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BuildError(f"{onnx_path}: TensorRT could not build an engine for profiles "
                         f"{[p.name for p in spec.profiles]}")
    return engine
