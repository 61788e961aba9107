"""TensorRT's Python API, found whichever package provides it, and what every build starts with.

Two flavours share one API: TensorRT (`tensorrt`, the NGC container's; engines for Triton's
tensorrt_plan backend) and TensorRT-RTX (`tensorrt_rtx`; builds on a machine without a GPU for a named
compute capability, which is how the tests run the production builder, `engines.build_engine`, on a CPU).
Each flavour's frontend package re-exports its bindings package; pip installs of the bindings alone
(`tensorrt-cuNN-bindings`) provide only `tensorrt_bindings`, so both names are tried.

`python -m flux2_klein.export.tensorrt --check [--version V]` (this folder's __main__.py) is the container
image's install check.
"""

from __future__ import annotations

import importlib
import logging
import os
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


# The inference library each flavour's bindings load (its file name up to ".so"), whose exported C function
# getInferLibVersion() says which library is really in the process: TensorRT's NvInferRuntime.h declares it
# (extern "C" int32_t getInferLibVersion()), encoded as NV_TENSORRT_MAJOR * 10000 + MINOR * 100 + PATCH since
# TensorRT 10 (NvInferVersion.h). The Python bindings do not wrap it, so it is called through ctypes on the
# library already mapped into this process: the one Triton's tensorrt_plan backend links in the image.
INFER_LIBRARIES = {"tensorrt": "libnvinfer.so", "tensorrt_rtx": "libtensorrt_rtx.so"}


def loaded_library(trt) -> Path | None:
    """The inference library file that importing `trt` mapped into this process (Linux), or None."""
    stem = INFER_LIBRARIES[flavour_of(trt)]
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if Path(path).name.startswith(stem):
            return Path(path)
    return None


def library_version(trt) -> tuple[str, Path] | None:
    """(MAJOR.MINOR.PATCH, file) of the inference library `trt` loaded, from its getInferLibVersion(); None
    where it cannot be found (not Linux, or the bindings linked it under another name)."""
    import ctypes

    path = loaded_library(trt)
    if path is None:
        return None
    n = int(ctypes.CDLL(str(path)).getInferLibVersion())
    return f"{n // 10000}.{n // 100 % 100}.{n % 100}", path


def check_install(trt, version: str | None = None) -> str:
    """What the image promises: the module imports (so its libraries, the ONNX parser's included, load),
    its wheel and the libnvinfer it loaded are one version (`version` when given: the image's libnvinfer
    package), and a Builder parses a graph with an OnnxParser. Returns a one-line report."""
    found = str(trt.__version__)
    if version and found != version:
        raise BuildError(f"tensorrt: version {found}, expected {version} (a plan built by another version "
                         "does not load in Triton)")
    library = library_version(trt)
    # The wheel's __version__ has four parts (10.13.3.9), the library's number three: compare those.
    if library is not None and found.split(".")[:3] != library[0].split("."):
        raise BuildError(f"tensorrt: the Python module is {found} but the library it loaded, {library[1]}, is "
                         f"{library[0]}; engines it builds would not load in the Triton that serves with that library")
    found = f"{found} ({f'{library[1].name} {library[0]}' if library else 'library version not found'})"
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
