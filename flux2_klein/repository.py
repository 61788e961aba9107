"""`flux2-klein build`: export the networks and assemble a ready Triton model repository.

    REPO/flux2_klein/      the ensemble (CONTRACT.md section 3)
    REPO/preprocess/       validation, tokenizer (a copy of the checkpoint's), reference decoding
    REPO/text_encoder/     \\
    REPO/transformer/       | the leaf networks: ONNX Runtime (CPU) or PyTorch (CPU or GPU) Python
    REPO/vae_decoder/       | models, tensorrt_plan in production (same names and tensors)
    REPO/vae_encoder/      /
    REPO/sampler/          the denoising loop
    REPO/build.json        what was built from what
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from importlib import resources
from pathlib import Path

from .checkpoint import load_checkpoint
from .progress import log, step
from .specs import NETWORKS, network_specs
from .triton_config import (
    ENSEMBLE, GPU_INSTANCES, Instances, ensemble_config, leaf_config, preprocess_config, sampler_config,
)

GLUE = {"preprocess": "preprocess.py", "sampler": "sampler.py", "onnxruntime": "onnxruntime_leaf.py",
        "torch": "torch_leaf.py"}
# --device -> where every model's instances run (Instances.kind)
DEVICES = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
# torch.compile modes a torch leaf may use: not the CUDA-graph ones ("reduce-overhead", "max-autotune"),
# whose outputs live in a graph pool that the next call overwrites while Triton may still hold them.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def _glue(name: str) -> str:
    return resources.files("flux2_klein.model_repository").joinpath(GLUE[name]).read_text()


def _write_model(repo: Path, name: str, config: str, glue: str | None = None) -> Path:
    version = repo / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(config)
    if glue is not None:
        (version / "model.py").write_text(glue)
    return version


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)  # graphs can be gigabytes: share the blocks when on one filesystem
    except OSError:
        shutil.copy2(src, dst)


def _onnx_leaf(repo: Path, ckpt, spec, instances: Instances, *, dtype: str, onnx_dir) -> dict:
    """A leaf network as a Python model over ONNX Runtime, its graph exported here or reused."""
    from .export.onnx_export import export_network

    version = _write_model(repo, spec.name, leaf_config(spec, instances, {"intra_op_threads": "1"}),
                           _glue("onnxruntime"))
    if onnx_dir is None:
        export_network(ckpt, spec, version, dtype)
    else:
        with step(f"{spec.name}: copy graph from {onnx_dir}"):
            for f in sorted((Path(onnx_dir) / spec.name).glob("model.*")):
                _link_or_copy(f, version / f.name)
    return {"onnx_sha256": json.loads((version / "model.json").read_text())["sha256"]}


def _torch_leaf(repo: Path, ckpt, spec, instances: Instances, *, dtype: str, onnx_dir, compile: str = "") -> dict:
    """A leaf network as a Python model running the checkpoint's torch module (export/wrappers.py).

    No weights enter the repository: the model loads them from the checkpoint path in its config.
    """
    if onnx_dir is not None:
        raise ValueError("onnx: the torch runtime runs the checkpoint's modules and takes no ONNX graphs")
    checkpoint = str(Path(ckpt.path).resolve())
    params = {"checkpoint": checkpoint, "dtype": dtype, "torch_compile": compile, "intra_op_threads": "1"}
    _write_model(repo, spec.name, leaf_config(spec, instances, params), _glue("torch"))
    return {"checkpoint": checkpoint, "dtype": dtype, "torch_compile": compile}


# runtime -> writer of one leaf model (config, glue, weights); each returns what the manifest records.
LEAF_WRITERS = {"onnxruntime": _onnx_leaf, "torch": _torch_leaf}


def build_repository(checkpoint: str | Path, out: str | Path, *, runtime: str = "onnxruntime",
                     dtype: str | None = None, onnx_dir: str | Path | None = None,
                     instances: Instances | None = None, device: str | None = None,
                     compile: bool | str = False, precision: str = "fp8", work: str | Path | None = None,
                     opt_level: int | None = None) -> Path:
    """Assemble REPO from a checkpoint; `onnx_dir` reuses graphs `export onnx` already wrote.

    device: "cpu" or "gpu" sets where the models' instances run (default: `instances.kind`, KIND_CPU);
      "gpu" without `instances` takes GPU_INSTANCES' counts (one copy of each network's weights).
    dtype: default bf16 for the torch runtime on a GPU, else fp32.
    compile: torch runtime only; True or a mode of COMPILE_MODES runs the leaves under torch.compile.
    precision, work, opt_level: tensorrt runtime only (see tensorrt_build.py): the DiT's precision, the
      folder for ONNX graphs and the timing cache (default REPO.work), the builder optimization level.
    """
    if runtime == "tensorrt":
        from .export.engines import current_target
        from .tensorrt_build import export_graphs, tensorrt_leaf_writer

        current_target()  # no TensorRT or no GPU: say so now, not after an hour of export
        ckpt = load_checkpoint(checkpoint)
        work = Path(work) if work else Path(str(Path(out)) + ".work")
        export_graphs(ckpt, work, precision)
        writers = {**LEAF_WRITERS, "tensorrt": tensorrt_leaf_writer(work, precision, opt_level)}
        device = "gpu"
    else:
        writers = LEAF_WRITERS
    if runtime not in writers:
        raise ValueError(f"runtime: {runtime!r} is not supported; allowed: {', '.join([*LEAF_WRITERS, 'tensorrt'])}")
    if device is not None and device not in DEVICES:
        raise ValueError(f"device: {device!r} is not supported; allowed: {', '.join(DEVICES)}")
    compile = "default" if compile is True else (compile or "")
    if compile and runtime != "torch":
        raise ValueError(f"compile: only the torch runtime compiles; this build's runtime is {runtime}")
    if compile and compile not in COMPILE_MODES:
        raise ValueError(f"compile: mode {compile!r} is not supported; allowed: {', '.join(COMPILE_MODES)}")

    ckpt = load_checkpoint(checkpoint)
    specs = network_specs(ckpt)
    instances = instances or (GPU_INSTANCES if device == "gpu" else Instances())
    if device is not None:
        instances = dataclasses.replace(instances, kind=DEVICES[device])
    gpu = instances.kind == DEVICES["gpu"]
    dtype = dtype or ("bf16" if runtime == "torch" and gpu else "fp32")
    options = {"compile": compile} if compile else {}  # runtime-specific: only the torch writer takes it
    repo = Path(out)
    repo.mkdir(parents=True, exist_ok=True)

    sources = {}
    for name in NETWORKS:
        sources[name] = writers[runtime](repo, ckpt, specs[name], instances, dtype=dtype, onnx_dir=onnx_dir,
                                              **options)

    with step("preprocess, sampler and the ensemble"):
        pre = _write_model(repo, "preprocess",
                           preprocess_config(specs["text_encoder"], instances,
                                             {"is_distilled": str(ckpt.is_distilled).lower()}),
                           _glue("preprocess"))
        shutil.copytree(ckpt.component("tokenizer"), pre / "tokenizer", dirs_exist_ok=True)
        _write_model(repo, "sampler",
                     sampler_config(specs["text_encoder"], specs["vae_decoder"], instances,
                                    {"scheduler_config": json.dumps(ckpt.scheduler),
                                     "channels": str(ckpt.latent_channels)}),
                     _glue("sampler"))
        _write_model(repo, ENSEMBLE, ensemble_config(specs))

    manifest = {
        "checkpoint": str(Path(checkpoint).resolve()), "runtime": runtime, "dtype": dtype,
        **({"precision": precision} if runtime == "tensorrt" else {}),
        "device": "gpu" if gpu else "cpu", "is_distilled": ckpt.is_distilled, "sources": sources,
    }
    (repo / "build.json").write_text(json.dumps(manifest, indent=1))
    log.info("repository ready: %s", repo)
    return repo
