"""TensorRT's Python API, found whichever package provides it, and what every build starts with.

Two flavours share one API: TensorRT (`tensorrt`, the NGC container's; engines for Triton's
tensorrt_plan backend) and TensorRT-RTX (`tensorrt_rtx`; builds on a machine without a GPU for a named
compute capability, which is how the tests run the production builder, `engines.build_engine`, on a CPU).
Each flavour's frontend package re-exports its bindings package; pip installs of the bindings alone
(`tensorrt-cuNN-bindings`) provide only `tensorrt_bindings`, so both names are tried.

`python -m flux2_klein.export.trt_build --check [--version V]` is the container image's install check.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

# flavour -> the modules that provide it, frontend first.
FLAVOURS = {
    "tensorrt": ("tensorrt", "tensorrt_bindings"),
    "tensorrt_rtx": ("tensorrt_rtx", "tensorrt_rtx_bindings"),
}
# Which flavour builds when the caller does not pass a module: TensorRT on the GPU machines that serve,
# TensorRT-RTX where engines are built without one (the CPU tests).
FLAVOUR_ENV = "FLUX2_KLEIN_TENSORRT"
DEFAULT_FLAVOUR = "tensorrt"


class BuildError(RuntimeError):
    pass


def import_trt(flavour: str | None = None):
    """The TensorRT module of `flavour` (default: $FLUX2_KLEIN_TENSORRT, else tensorrt); ImportError
    names every module tried and why each failed."""
    flavour = flavour or os.environ.get(FLAVOUR_ENV) or DEFAULT_FLAVOUR
    if flavour not in FLAVOURS:
        raise ValueError(f"tensorrt flavour: {flavour!r}, expected one of {', '.join(FLAVOURS)}")
    errors = []
    for name in FLAVOURS[flavour]:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError(f"{flavour}: no module provides it ({'; '.join(errors)})")


def flavour_of(trt) -> str:
    return "tensorrt_rtx" if trt.__name__.startswith("tensorrt_rtx") else "tensorrt"


def parse(trt, onnx_path: Path, logger=None):
    """Parse an ONNX file (external weights resolved beside it) into a strongly typed network."""
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: the graph's own casts and Q/DQ decide every tensor's type, not the builder.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT could not parse the graph: {errors}")
    return builder, network, parser


def _probe_graph() -> bytes:
    """A two-input MatMul, opset 18: enough to exercise the ONNX parser end to end."""
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 4])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["y"])], "probe", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def check_install(trt, version: str | None = None) -> str:
    """What the image promises: the module imports (so its libraries, the ONNX parser's included, load),
    is `version`, and a Builder parses a graph with an OnnxParser. Returns a one-line report."""
    found = str(trt.__version__)
    if version and found != version:
        raise BuildError(f"tensorrt: version {found}, expected {version} (a plan built by another version "
                         "does not load in Triton)")
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except (TypeError, RuntimeError) as e:
        # TensorRT (not -RTX) needs a CUDA device for a Builder; `docker build` has none. The import
        # above already loaded libnvinfer and libnvonnxparser, which the bindings link.
        if flavour_of(trt) == "tensorrt" and not _gpu_visible():
            return f"{trt.__name__} {found}: imports; no GPU here, Builder and OnnxParser not tried ({e})"
        raise BuildError(f"{trt.__name__} {found}: cannot create a Builder: {e}") from None
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(_probe_graph()) or network.num_layers < 1:
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BuildError(f"{trt.__name__} {found}: the OnnxParser failed on a one-MatMul graph: {errors}")
    return f"{trt.__name__} {found}: Builder and OnnxParser work ({network.num_layers} layer parsed)"


def _gpu_visible() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flux2_klein.export.trt_build",
                                description="Check that TensorRT's Python API is installed and works.")
    p.add_argument("--check", action="store_true", required=True)
    p.add_argument("--flavour", choices=tuple(FLAVOURS), default=None)
    p.add_argument("--version", default=None, help="the exact TensorRT version required")
    args = p.parse_args(argv)
    try:
        print(check_install(import_trt(args.flavour), args.version))
    except (ImportError, BuildError) as e:
        print(f"TensorRT check failed: {e}", file=sys.stderr)
        return 1
    return 0


def build_serialized(trt, onnx_path: Path, spec, *, optimization_level: int | None = None):
    """Deprecated shim for tests/test_fp8.py until it moves to `engines.serialize` (the one build path)."""
    from .engines import EnginePlan, serialize

    plan = EnginePlan(spec=spec, onnx_path=Path(onnx_path), engine_path=Path(onnx_path).with_suffix(".plan"),
                      precision="bf16", **({"opt_level": optimization_level} if optimization_level else {}))
    return serialize(trt, plan, None)[0]


if __name__ == "__main__":
    sys.exit(main())
