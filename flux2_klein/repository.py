"""`flux2-klein build`: export the networks and assemble a ready Triton model repository.

    REPO/flux2_klein/      the ensemble (CONTRACT.md section 3)
    REPO/preprocess/       validation, tokenizer (a copy of the checkpoint's), reference decoding
    REPO/text_encoder/     \\
    REPO/transformer/       | the leaf networks: ONNX Runtime (CPU) Python models here,
    REPO/vae_decoder/       | tensorrt_plan in production (same names and tensors)
    REPO/vae_encoder/      /
    REPO/sampler/          the denoising loop
    REPO/build.json        what was built from what
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

from .checkpoint import load_checkpoint
from .progress import log, step
from .specs import NETWORKS, network_specs
from .triton_config import (
    ENSEMBLE, Instances, ensemble_config, leaf_config, preprocess_config, sampler_config,
)

GLUE = {"preprocess": "preprocess.py", "sampler": "sampler.py", "onnxruntime": "onnxruntime_leaf.py"}


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


# runtime -> writer of one leaf model (config, glue, weights); each returns what the manifest records.
LEAF_WRITERS = {"onnxruntime": _onnx_leaf}


def build_repository(checkpoint: str | Path, out: str | Path, *, runtime: str = "onnxruntime",
                     dtype: str = "fp32", onnx_dir: str | Path | None = None,
                     instances: Instances | None = None) -> Path:
    """Assemble REPO from a checkpoint; `onnx_dir` reuses graphs `export onnx` already wrote."""
    if runtime not in LEAF_WRITERS:
        raise ValueError(f"runtime: {runtime!r} is not supported; allowed: {', '.join(LEAF_WRITERS)}")

    ckpt = load_checkpoint(checkpoint)
    specs = network_specs(ckpt)
    instances = instances or Instances()
    repo = Path(out)
    repo.mkdir(parents=True, exist_ok=True)

    sources = {}
    for name in NETWORKS:
        sources[name] = LEAF_WRITERS[runtime](repo, ckpt, specs[name], instances, dtype=dtype, onnx_dir=onnx_dir)

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
        "is_distilled": ckpt.is_distilled, "sources": sources,
    }
    (repo / "build.json").write_text(json.dumps(manifest, indent=1))
    log.info("repository ready: %s", repo)
    return repo
