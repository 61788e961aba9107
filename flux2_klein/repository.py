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
from .contract import PRECISIONS
from .progress import log, step
from .specs import NETWORKS, network_specs
from .triton_config import (
    ENSEMBLE, GPU_INSTANCES, Batching, Instances, ensemble_config, leaf_config, preprocess_config, sampler_config,
    with_boundary,
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


@dataclasses.dataclass(frozen=True)
class TorchOptions:
    """The torch runtime's choices (see torch_runtime.py): a torch.compile mode or "", the networks whose
    GEMMs run in FP8, the sizes warmed at load ("", "all" or "WxH,..."), the DiT batch rows to warm, the
    reference counts to warm (0: none, and the VAE encoder warms nothing)."""

    compile: str = ""
    fp8: tuple[str, ...] = ()
    warm_sizes: str = ""
    max_dit_rows: int = 1
    warm_references: int = 4  # sizes.MAX_REFERENCES


def _torch_leaf(repo: Path, ckpt, spec, instances: Instances, *, dtype: str, onnx_dir,
                torch_options: TorchOptions = TorchOptions()) -> dict:
    """A leaf network as a Python model running the checkpoint's torch module (export/wrappers.py).

    No weights enter the repository: the model loads them from the checkpoint path in its config.
    """
    if onnx_dir is not None:
        raise ValueError("onnx: the torch runtime runs the checkpoint's modules and takes no ONNX graphs")
    checkpoint = str(Path(ckpt.path).resolve())
    o = torch_options
    fp8 = spec.name in o.fp8
    params = {"checkpoint": checkpoint, "dtype": dtype, "fp8": str(fp8).lower(), "torch_compile": o.compile,
              "warm_sizes": o.warm_sizes, "max_dit_rows": str(o.max_dit_rows),
              "warm_references": str(o.warm_references), "intra_op_threads": "1"}
    _write_model(repo, spec.name, leaf_config(spec, instances, params), _glue("torch"))
    return {"checkpoint": checkpoint, "dtype": dtype, "fp8": fp8, "torch_compile": o.compile,
            "warm_sizes": o.warm_sizes}


def _lora_manifest(checkpoint) -> dict | None:
    from .lora import manifest

    return manifest(checkpoint)


# runtime -> writer of one leaf model (config, glue, weights); each returns what the manifest records.
LEAF_WRITERS = {"onnxruntime": _onnx_leaf, "torch": _torch_leaf}


def build_repository(checkpoint: str | Path, out: str | Path, *, runtime: str = "onnxruntime",
                     dtype: str | None = None, onnx_dir: str | Path | None = None,
                     instances: Instances | None = None, device: str | None = None,
                     compile: bool | str = False, precision: str | None = None, work: str | Path | None = None,
                     opt_level: int | None = None, batching: Batching | None = None,
                     fp8_text_encoder: bool = False, warm_sizes: str | None = None, guardrail=None,
                     boundary: str | None = None, loras=(), warm_references: int | None = None) -> Path:
    """Assemble REPO from a checkpoint; `onnx_dir` reuses graphs `export onnx` already wrote.

    device: "cpu" or "gpu" sets where the models' instances run (default: `instances.kind`, KIND_CPU);
      "gpu" without `instances` takes GPU_INSTANCES' counts (one copy of each network's weights).
    dtype: default bf16 for the torch runtime on a GPU, else fp32.
    compile: torch runtime only; True or a mode of COMPILE_MODES runs the leaves under torch.compile.
    precision: the DiT's GEMMs, fp8 or bf16: tensorrt (default fp8) and torch on a GPU (default bf16: FP8
      becomes its default once measured within what `export fp8` accepts); fp8_text_encoder: torch only.
    warm_sizes: torch only; the sizes every leaf runs once at load ("", "all", "WxH,..."; default "all"
      when compiling on a GPU, "1024x1024" on a GPU otherwise, "" on a CPU); warm_references: torch only,
      the reference counts warmed (0..4, default 4; 0 where no request brings a reference).
    boundary: the dtype of the big tensors between models (triton_config.BF16_BOUNDARY), "bfloat16" or
      "float32"; default bfloat16 for torch leaves computing in bf16 (lossless there: the modules cast their
      inputs to bf16 and their outputs come from bf16), else float32.
    loras: flux2_klein.lora.LoraSpec list, fused in order into a copy of the checkpoint's transformer
      (REPO.lora beside the repository, which it then serves from and must keep) before anything else.
    guardrail: flux2_klein.guardrail.GuardrailSettings (default: the prompt check with the shipped list);
      an image classifier adds the `safety` model as the ensemble's last step.
    batching: how the sampler batches concurrent requests (default Batching(); on TensorRT the DiT's rows
      are capped at its engine's profile maximum).
    work, opt_level: tensorrt runtime only (see export/tensorrt/plan.py): the folder for ONNX graphs and the
      timing cache (default REPO.work), the builder optimization level.
    """
    if loras:
        from .lora import fuse_loras

        if onnx_dir is not None:
            raise ValueError("onnx: graphs exported without the LoRAs cannot serve them; leave out onnx with lora")
        # Beside the repository, not in it: Triton takes every folder of a repository for a model.
        fused = Path(str(Path(out)) + ".lora")
        if fused.exists():  # a rebuild: fuse anew, the LoRAs may have changed
            shutil.rmtree(fused)
        checkpoint = fuse_loras(checkpoint, list(loras), fused)
    if runtime == "tensorrt" and onnx_dir is not None:
        raise ValueError("onnx: the tensorrt runtime exports its own graphs (bf16/<network>, fp8/transformer) "
                         "into its work folder; pass a folder of that layout as work, not as onnx")
    if runtime == "tensorrt":
        from .export.tensorrt.build import current_target
        from .export.tensorrt.plan import export_graphs, tensorrt_leaf_writer

        current_target()  # no TensorRT or no GPU: say so now, not after an hour of export
        ckpt = load_checkpoint(checkpoint)
        work = Path(work) if work else Path(str(Path(out)) + ".work")
        export_graphs(ckpt, work, precision or "fp8")
        writers = {**LEAF_WRITERS, "tensorrt": tensorrt_leaf_writer(work, precision or "fp8", opt_level)}
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
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    if runtime == "onnxruntime" and precision not in (None, "bf16") or fp8_text_encoder and runtime != "torch":
        raise ValueError(f"precision: FP8 on runtime {runtime} is not built here; FP8 runs on tensorrt "
                         "(export fp8) and torch (--device gpu)")
    if warm_sizes is not None and runtime != "torch":
        raise ValueError(f"warm_sizes: only the torch runtime warms its leaves; this build's runtime is {runtime}")

    ckpt = load_checkpoint(checkpoint)
    instances = instances or (GPU_INSTANCES if device == "gpu" else Instances())
    if device is not None:
        instances = dataclasses.replace(instances, kind=DEVICES[device])
    gpu = instances.kind == DEVICES["gpu"]
    dtype = dtype or ("bf16" if runtime == "torch" and gpu else "fp32")
    # Leaves that compute in bf16 hand each other bf16 (triton_config.BF16_BOUNDARY); engines and graphs
    # keep the float32 boundary of their export.
    boundary = boundary or ("bfloat16" if runtime == "torch" and dtype == "bf16" else "float32")
    if boundary not in ("bfloat16", "float32") or boundary == "bfloat16" and (runtime, dtype) != ("torch", "bf16"):
        raise ValueError(f"boundary: {boundary!r} is not supported here; bfloat16 needs the torch runtime computing "
                         "in bf16, float32 always works")
    specs = with_boundary(network_specs(ckpt), boundary)
    batching = batching or Batching()
    if runtime == "tensorrt":  # an engine takes no more rows than its profiles' maximum
        engine_rows = max(p.dims["batch"][2] for p in specs["transformer"].profiles)
        batching = dataclasses.replace(batching, max_dit_rows=min(batching.max_dit_rows, engine_rows))
    options = {}  # runtime-specific: only the torch writer takes options
    fp8 = ("transformer",) * (precision == "fp8") + ("text_encoder",) * fp8_text_encoder
    if runtime == "torch":
        if fp8 and not gpu:
            raise ValueError("precision: FP8 GEMMs need a GPU (compute capability 8.9+); use --device gpu")
        if warm_sizes is None:
            warm_sizes = ("all" if compile else "1024x1024") if gpu else ""
        options["torch_options"] = TorchOptions(compile, fp8, warm_sizes, batching.max_dit_rows,
                                                *(() if warm_references is None else (warm_references,)))
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
                     sampler_config(specs["text_encoder"], specs["vae_decoder"], instances, batching,
                                    {"scheduler_config": json.dumps(ckpt.scheduler),
                                     "dit_dtype": "bf16" if boundary == "bfloat16" else "fp32",
                                     "channels": str(ckpt.latent_channels)}),
                     _glue("sampler"))
        from .guardrail.repository import write as write_guardrail
        from .guardrail.settings import GuardrailSettings

        guardrail = guardrail or GuardrailSettings()
        safety = write_guardrail(repo, guardrail, instances=instances.vae_decoder, kind=instances.kind)
        _write_model(repo, ENSEMBLE, ensemble_config(specs, safety))

    manifest = {
        "checkpoint": str(Path(checkpoint).resolve()), "runtime": runtime, "dtype": dtype,
        **({"precision": precision or "fp8"} if runtime == "tensorrt" else {}),
        **({"precision": "fp8" if fp8 else "bf16", "fp8": list(fp8)} if runtime == "torch" else {}),
        "device": "gpu" if gpu else "cpu", "is_distilled": ckpt.is_distilled, "sources": sources,
        "batching": dataclasses.asdict(batching), "guardrail": guardrail.to_dict(), "boundary": boundary,
        **({"lora": _lora_manifest(checkpoint)} if loras else {}),
    }
    (repo / "build.json").write_text(json.dumps(manifest, indent=1))
    log.info("repository ready: %s", repo)
    return repo
