"""`flux2-klein export onnx`: every network of a checkpoint to an ONNX graph ready for TensorRT.

Opset 18, dynamic axes from the specs, constant-folded (onnxscript's optimizer, run by the torch
exporter) and shape-inferred, weights in an external file when the graph passes protobuf's 2 GB
limit. One network at a time is loaded, exported and freed, so peak memory is one network's.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint, load_checkpoint
from ..dtypes import COMPUTE_DTYPES, torch_dtype
from ..files import file_sha256
from ..networks import load_wrapper
from ..progress import step
from ..specs import NETWORKS, NetworkSpec, example_inputs, network_specs

log = logging.getLogger(__name__)


class _AbsentTorchvision(logging.Filter):
    """torch.onnx's exporter registers torchvision's ONNX functions on every export and, torchvision not
    being installed (no network here uses it), warns once per function: 16 lines per graph. Only those
    records are dropped; every other warning of the exporter still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


def quiet_absent_torchvision() -> None:
    logging.getLogger("torch.onnx._internal.exporter._registration").addFilter(_AbsentTorchvision())


quiet_absent_torchvision()  # every export, from the command or in process

OPSET = 18
# ONNX allows bfloat16 convolutions from opset 22 on: the VAE graphs in bf16 need it to be valid ONNX
# (other tools check types). 22 is also what the builders parse: TensorRT 10.13 (Triton 25.10's) and
# TensorRT-RTX 1.7, see engines.PARSER_OPSETS; build_engine refuses a graph above its builder's.
OPSET_BF16 = 22  # also FP8 graphs (Q/DQ in float8 needs 19)
PROTOBUF_LIMIT = 2**31 - 1
# Example sizes for tracing: batch 2 and uneven sides so that no dynamic dimension is traced at 1
# or at a value equal to another dimension (torch.export would specialise or merge them).
TRACE_SIZE = (720, 1456)
TRACE_REFERENCES = ((768, 512),)


def dynamic_shapes(spec: NetworkSpec) -> dict[str, dict[int, object] | None]:
    """torch.export dimensions named as in the spec, bounded by the union of its profiles."""
    dims: dict[str, object] = {}

    def dim(name: str):
        if name not in dims:
            if name in spec.derived:
                base, factor = spec.derived[name]
                hi = max(p.dims[name][2] for p in spec.profiles) // factor
                dims[name] = factor * torch.export.Dim(base, min=1, max=hi)
            else:
                hi = max(p.dims[name][2] for p in spec.profiles)
                dims[name] = torch.export.Dim(name, min=1, max=hi)
        return dims[name]

    return {t.name: ({i: dim(d) for i, d in t.dynamic_axes.items()} or None) for t in spec.inputs}


def export_network(ckpt: Checkpoint, spec: NetworkSpec, target: Path, dtype: str = "fp32") -> Path:
    """Export one network to target/model.onnx and write model.json beside it."""
    with step(f"{spec.name}: load weights ({dtype})"):
        module = load_wrapper(ckpt, spec.name, torch_dtype(dtype))
    return export_module(module, ckpt, spec, target, dtype)


def export_module(module: torch.nn.Module, ckpt: Checkpoint, spec: NetworkSpec, target: Path, dtype: str,
                  precision: str | None = None, translations: dict | None = None,
                  extra_meta: dict | None = None) -> Path:
    """Trace `module` (the spec's signature) to target/model.onnx, fold, save, infer shapes, describe."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    onnx_path = target / "model.onnx"
    # model.json is written last and marks a finished export: a re-export first takes it away, so an
    # interrupted one is never taken for finished (tensorrt.plan.export_graphs resumes on it).
    (target / "model.json").unlink(missing_ok=True)
    precision = precision or dtype
    rng = np.random.default_rng(0)
    example = example_inputs(spec, rng, batch=2, size=TRACE_SIZE, references=TRACE_REFERENCES)
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    # FP8 Q/DQ exists from opset 19, bfloat16 convolutions from 22; plain float graphs stay at 18.
    opset = OPSET if precision in ("fp32", "fp16") else OPSET_BF16
    with step(f"{spec.name}: trace and convert to ONNX opset {opset}"), torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=dynamic_shapes(spec), optimize=True,
            verbose=False, custom_translation_table=translations,
        )
    del module
    gc.collect()
    for stale in (onnx_path, target / "model.onnx.data"):
        stale.unlink(missing_ok=True)
    with step(f"{spec.name}: save"):
        program.save(onnx_path, external_data=_weights_bytes(program) > PROTOBUF_LIMIT - (64 << 20))
    del program
    gc.collect()
    with step(f"{spec.name}: shape inference"):
        _infer_shapes(onnx_path)
    meta = {
        "network": spec.name,
        "checkpoint": str(ckpt.path),
        "dtype": dtype,
        "precision": precision,
        "opset": opset,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.outputs],
        "profiles": [{"name": p.name, "dims": p.dims} for p in spec.profiles],
        "sha256": file_sha256(onnx_path),
        "files": sorted(p.name for p in target.iterdir() if p.name.startswith("model.onnx")),
        "torch": torch.__version__,
        **(extra_meta or {}),
    }
    (target / "model.json").write_text(json.dumps(meta, indent=1))
    size = sum((target / f).stat().st_size for f in meta["files"])
    log.info("%s: %s (%.1f MB)", spec.name, onnx_path, size / 1e6)
    return onnx_path


def _weights_bytes(program) -> int:
    return sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in program.model.graph.initializers.values())


def _infer_shapes(path: Path) -> None:
    import onnx

    # The path variant works above 2 GB, where the in-memory one cannot serialise the model.
    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=False,
                                           data_prop=True)


def export_onnx(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32",
                networks: tuple[str, ...] = NETWORKS) -> dict[str, Path]:
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not supported; allowed: {', '.join(COMPUTE_DTYPES)}")
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        raise ValueError(f"networks: unknown {', '.join(unknown)}; allowed: {', '.join(NETWORKS)}")
    ckpt = load_checkpoint(checkpoint)
    specs = network_specs(ckpt)
    out = {}
    for name in networks:
        out[name] = export_network(ckpt, specs[name], Path(out_dir) / name, dtype)
    return out
