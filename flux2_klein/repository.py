"""`flux2-klein build`: export the networks and assemble a ready Triton model repository.

    REPO/flux2_klein/      the ensemble (CONTRACT.md section 3)
    REPO/preprocess/       validation, tokenizer (a copy of the checkpoint's), reference decoding
    REPO/text_encoder/     \\
    REPO/transformer/       | the leaf networks: ONNX Runtime (CPU) or PyTorch (CPU or GPU) Python
    REPO/vae_decoder/       | models, tensorrt_plan in production (same names and tensors)
    REPO/vae_encoder/      /
    REPO/sampler/          the denoising loop
    REPO/postprocess/      padding_mask_crop's paste back after decoding (build --padding-mask-crop)
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
from .contract import PRECISIONS, RUNTIMES, TENSORRT_PRECISION
from .dtypes import DEVICE_DTYPES
from .lora_library import LIBRARY_PARAMETER, NAMES_PARAMETER
from .progress import log, step
from .specs import NETWORKS, network_specs
from .triton_config import (
    ENSEMBLE, GPU_INSTANCES, LORA_INPUT, POSTPROCESS_MODEL, Batching, Instances, ensemble_config, leaf_config,
    postprocess_config, preprocess_config, sampler_config, with_boundary,
)

# A Python model's glue: its model.py, from flux2_klein/model_repository/.
GLUE = {"preprocess": "preprocess.py", "sampler": "sampler.py", "postprocess": "postprocess.py", "safety": "safety.py",
        "onnxruntime": "onnxruntime_leaf.py",
        "torch": "torch_leaf.py"}
# --device -> where every model's instances run (Instances.kind)
DEVICES = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
# torch.compile modes a torch leaf may use: not the CUDA-graph ones ("reduce-overhead", "max-autotune"),
# whose outputs live in a graph pool that the next call overwrites while Triton may still hold them.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def _glue(name: str) -> str:
    return resources.files("flux2_klein.model_repository").joinpath(GLUE[name]).read_text()


def write_model(repo: Path, name: str, config: str, glue: str | None = None) -> Path:
    """REPO/<name>/config.pbtxt and, for a Python model, its glue (a GLUE key) as 1/model.py: the one way a
    model folder is written (the TensorRT leaves' and the safety model's too). Returns REPO/<name>/1."""
    version = Path(repo) / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (Path(repo) / name / "config.pbtxt").write_text(config)
    if glue is not None:
        (version / "model.py").write_text(_glue(glue))
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

    version = write_model(repo, spec.name, leaf_config(spec, instances, {"intra_op_threads": "1"}),
                          "onnxruntime")
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
    lora_library: object = None  # flux2_klein.lora_library.Library: the DiT's per-request LoRAs


def _torch_leaf(repo: Path, ckpt, spec, instances: Instances, *, dtype: str, onnx_dir,
                torch_options: TorchOptions = TorchOptions()) -> dict:
    """A leaf network as a Python model running the checkpoint's torch module (networks.py).

    No weights enter the repository: the model loads them from the checkpoint path in its config.
    """
    checkpoint = str(Path(ckpt.path).resolve())
    o = torch_options
    fp8 = spec.name in o.fp8
    params = {"checkpoint": checkpoint, "dtype": dtype, "fp8": str(fp8).lower(), "torch_compile": o.compile,
              "warm_sizes": o.warm_sizes, "max_dit_rows": str(o.max_dit_rows),
              "warm_references": str(o.warm_references), "intra_op_threads": "1"}
    extra_inputs = ()
    if spec.name == "transformer" and o.lora_library is not None:
        params[LIBRARY_PARAMETER] = o.lora_library.to_json()
        extra_inputs = (LORA_INPUT,)
    write_model(repo, spec.name, leaf_config(spec, instances, params, extra_inputs), "torch")
    return {"checkpoint": checkpoint, "dtype": dtype, "fp8": fp8, "torch_compile": o.compile,
            "warm_sizes": o.warm_sizes}


def _lora_manifest(checkpoint) -> dict | None:
    from .lora import manifest

    return manifest(checkpoint)


# runtime -> writer of one leaf model (config, glue, weights); each returns what the manifest records.
LEAF_WRITERS = {"onnxruntime": _onnx_leaf, "torch": _torch_leaf}


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Every choice of a `build` besides the checkpoint and the output folder, checked as a whole by
    `resolved()` before any work starts (a LoRA fused or a graph exported for a build that would be refused
    is an hour lost with TensorRT). `build_repository` takes it, or its fields as keyword arguments.

    runtime: onnxruntime, torch or tensorrt (contract.RUNTIMES); onnx_dir reuses graphs `export onnx` wrote.
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
    padding_mask_crop: serve the inpainting input `padding_mask_crop`: adds the `postprocess` model (its paste
      back after decoding) to the ensemble, a Python model every request then passes (stages.OPTIONAL_STAGES);
      without it the input is refused by name.
    lora_library: a folder of `<name>.safetensors` LoRAs a request picks from by its `loras` input
      (flux2_klein/lora_library.py): torch runtime only, eager, without FP8 GEMMs; every file is checked
      against the checkpoint before any other work. Without it `loras` is refused by name.
    """

    runtime: str = "onnxruntime"
    dtype: str | None = None
    onnx_dir: str | Path | None = None
    instances: Instances | None = None
    device: str | None = None
    compile: bool | str = False
    precision: str | None = None
    work: str | Path | None = None
    opt_level: int | None = None
    batching: Batching | None = None
    fp8_text_encoder: bool = False
    warm_sizes: str | None = None
    guardrail: object = None
    boundary: str | None = None
    loras: tuple = ()
    warm_references: int | None = None
    padding_mask_crop: bool = False
    lora_library: str | Path | None = None

    def resolved(self) -> BuildOptions:
        """These options with every default applied, or ValueError naming the first option refused."""
        o = self
        if o.runtime not in RUNTIMES:
            raise ValueError(f"runtime: {o.runtime!r} is not supported; allowed: {', '.join(RUNTIMES)}")
        if o.loras and o.onnx_dir is not None:
            raise ValueError("onnx: graphs exported without the LoRAs cannot serve them; leave out onnx with lora")
        if o.runtime == "tensorrt" and o.onnx_dir is not None:
            raise ValueError("onnx: the tensorrt runtime exports its own graphs (bf16/<network>, fp8/transformer) "
                             "into its work folder; pass a folder of that layout as work, not as onnx")
        if o.runtime == "torch" and o.onnx_dir is not None:
            raise ValueError("onnx: the torch runtime runs the checkpoint's modules and takes no ONNX graphs")
        device = "gpu" if o.runtime == "tensorrt" else o.device
        if device is not None and device not in DEVICES:
            raise ValueError(f"device: {device!r} is not supported; allowed: {', '.join(DEVICES)}")
        compile = "default" if o.compile is True else (o.compile or "")
        if compile and o.runtime != "torch":
            raise ValueError(f"compile: only the torch runtime compiles; this build's runtime is {o.runtime}")
        if compile and compile not in COMPILE_MODES:
            raise ValueError(f"compile: mode {compile!r} is not supported; allowed: {', '.join(COMPILE_MODES)}")
        if o.precision is not None and o.precision not in PRECISIONS:
            raise ValueError(f"precision: {o.precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
        if o.runtime == "onnxruntime" and o.precision not in (None, "bf16") or o.fp8_text_encoder and o.runtime != "torch":
            raise ValueError(f"precision: FP8 on runtime {o.runtime} is not built here; FP8 runs on tensorrt "
                             "(export fp8) and torch (--device gpu)")
        if o.warm_sizes is not None and o.runtime != "torch":
            raise ValueError(f"warm_sizes: only the torch runtime warms its leaves; this build's runtime is {o.runtime}")
        instances = o.instances or (GPU_INSTANCES if device == "gpu" else Instances())
        if device is not None:
            instances = dataclasses.replace(instances, kind=DEVICES[device])
        gpu = instances.kind == DEVICES["gpu"]
        dtype = o.dtype or (DEVICE_DTYPES["gpu" if gpu else "cpu"] if o.runtime == "torch" else "fp32")
        # Leaves that compute in bf16 hand each other bf16 (triton_config.BF16_BOUNDARY); engines and graphs
        # keep the float32 boundary of their export.
        boundary = o.boundary or ("bfloat16" if o.runtime == "torch" and dtype == "bf16" else "float32")
        if boundary not in ("bfloat16", "float32") or boundary == "bfloat16" and (o.runtime, dtype) != ("torch", "bf16"):
            raise ValueError(f"boundary: {boundary!r} is not supported here; bfloat16 needs the torch runtime "
                             "computing in bf16, float32 always works")
        if o.runtime == "torch" and self.fp8 and not gpu:
            raise ValueError("precision: FP8 GEMMs need a GPU (compute capability 8.9+); use --device gpu")
        warm_sizes = o.warm_sizes
        if o.runtime == "torch" and warm_sizes is None:
            warm_sizes = ("all" if compile else "1024x1024") if gpu else ""
        precision = o.precision or (TENSORRT_PRECISION if o.runtime == "tensorrt" else None)
        if o.lora_library is not None:
            _check_lora_library_options(o.runtime, compile, precision == "fp8" or o.fp8_text_encoder)
        return dataclasses.replace(o, device=device, compile=compile, instances=instances, dtype=dtype,
                                   boundary=boundary, warm_sizes=warm_sizes, precision=precision,
                                   batching=o.batching or Batching(), loras=tuple(o.loras))

    @property
    def fp8(self) -> tuple[str, ...]:
        """The networks whose GEMMs run in FP8 on the torch runtime."""
        return ("transformer",) * (self.precision == "fp8") + ("text_encoder",) * self.fp8_text_encoder


def _check_lora_library_options(runtime: str, compile: str, fp8: bool) -> None:
    """ValueError naming lora_library when this build cannot serve per-request LoRAs (lora_library.py says why)."""
    if runtime != "torch":
        raise ValueError(f"lora_library: per-request LoRAs run on the torch runtime only (unfused peft adapters); "
                         f"{runtime} carries its weights inside its graphs or engines: fuse LoRAs at build time with "
                         "--lora FILE[:SCALE], or build with --runtime torch")
    if compile:
        raise ValueError("lora_library: not with torch.compile yet: switching a request's LoRAs changes the "
                         "adapters' Python state, which compiled graphs guard on (a recompile per new set); "
                         "leave out --compile")
    if fp8:
        raise ValueError("lora_library: not with FP8 GEMMs yet: torchao's float8 layers under peft adapters are "
                         "not verified here (no GPU); leave out --precision fp8 / --fp8-text-encoder")


def build_repository(checkpoint: str | Path, out: str | Path, options: BuildOptions | None = None,
                     **fields) -> Path:
    """Assemble REPO from a checkpoint with `options` (BuildOptions, or its fields as keyword arguments),
    all of them checked before any work."""
    if options is not None and fields:
        raise TypeError("build_repository: pass options or keyword fields, not both")
    o = (options or BuildOptions(**fields)).resolved()
    library = None
    if o.lora_library is not None:
        from .lora_library import scan

        with step(f"LoRA library {o.lora_library}"):
            library = scan(o.lora_library, checkpoint)  # every file checked before any other work
        log.info("LoRA library: %s", ", ".join(library.names))
    if o.loras:
        from .lora import fuse_loras

        # Beside the repository, not in it: Triton takes every folder of a repository for a model.
        fused = Path(str(Path(out)) + ".lora")
        if fused.exists():  # a rebuild: fuse anew, the LoRAs may have changed
            shutil.rmtree(fused)
        checkpoint = fuse_loras(checkpoint, list(o.loras), fused)
    if o.runtime == "tensorrt":
        from .export.tensorrt.build import current_target
        from .export.tensorrt.plan import default_work, export_graphs, tensorrt_leaf_writer

        current_target()  # no TensorRT or no GPU: say so now, not after an hour of export
        ckpt = load_checkpoint(checkpoint)
        work = Path(o.work) if o.work else default_work(out)
        export_graphs(ckpt, work, o.precision)
        writers = {**LEAF_WRITERS, "tensorrt": tensorrt_leaf_writer(work, o.precision, o.opt_level)}
    else:
        writers = LEAF_WRITERS

    ckpt = load_checkpoint(checkpoint)
    instances, dtype, boundary, runtime, onnx_dir = o.instances, o.dtype, o.boundary, o.runtime, o.onnx_dir
    gpu = instances.kind == DEVICES["gpu"]
    specs = with_boundary(network_specs(ckpt), boundary)
    batching = o.batching
    if runtime == "tensorrt":  # an engine takes no more rows than its profiles' maximum
        engine_rows = max(p.dims["batch"][2] for p in specs["transformer"].profiles)
        batching = dataclasses.replace(batching, max_dit_rows=min(batching.max_dit_rows, engine_rows))
    options = {}  # runtime-specific: only the torch writer takes options
    if runtime == "torch":
        options["torch_options"] = TorchOptions(
            o.compile, o.fp8, o.warm_sizes, batching.max_dit_rows, lora_library=library,
            **({} if o.warm_references is None else {"warm_references": o.warm_references}))
    repo = Path(out)
    repo.mkdir(parents=True, exist_ok=True)

    sources = {}
    for name in NETWORKS:
        sources[name] = writers[runtime](repo, ckpt, specs[name], instances, dtype=dtype, onnx_dir=onnx_dir,
                                              **options)

    with step("preprocess, sampler, postprocess and the ensemble"):
        pre = write_model(repo, "preprocess",
                          preprocess_config(specs["text_encoder"], instances,
                                            {"is_distilled": str(ckpt.is_distilled).lower(),
                                             "padding_mask_crop": str(o.padding_mask_crop).lower(),
                                             NAMES_PARAMETER: json.dumps(list(library.names) if library else [])}),
                          "preprocess")
        shutil.copytree(ckpt.component("tokenizer"), pre / "tokenizer", dirs_exist_ok=True)
        write_model(repo, "sampler",
                    sampler_config(specs["text_encoder"], specs["vae_decoder"], instances, batching,
                                   {"scheduler_config": json.dumps(ckpt.scheduler),
                                    "dit_dtype": "bf16" if boundary == "bfloat16" else "fp32",
                                    "channels": str(ckpt.latent_channels)}),
                    "sampler")
        if o.padding_mask_crop:
            write_model(repo, POSTPROCESS_MODEL, postprocess_config(specs["vae_decoder"], instances), "postprocess")
        else:
            shutil.rmtree(repo / POSTPROCESS_MODEL, ignore_errors=True)  # a rebuild without it
        from .guardrail.repository import write as write_guardrail
        from .guardrail.settings import GuardrailSettings

        guardrail = o.guardrail or GuardrailSettings()
        safety = write_guardrail(repo, guardrail, instances=instances.vae_decoder, kind=instances.kind)
        write_model(repo, ENSEMBLE, ensemble_config(specs, safety, postprocess=o.padding_mask_crop))

    manifest = {
        "checkpoint": str(Path(checkpoint).resolve()), "runtime": runtime, "dtype": dtype,
        **({"precision": o.precision} if runtime == "tensorrt" else {}),
        **({"precision": "fp8" if o.fp8 else "bf16", "fp8": list(o.fp8)} if runtime == "torch" else {}),
        "device": "gpu" if gpu else "cpu", "is_distilled": ckpt.is_distilled, "sources": sources,
        "batching": dataclasses.asdict(batching), "guardrail": guardrail.to_dict(), "boundary": boundary,
        "padding_mask_crop": o.padding_mask_crop,
        **({"lora": _lora_manifest(checkpoint)} if o.loras else {}),
        **({"lora_library": json.loads(library.to_json())} if library else {}),
    }
    (repo / "build.json").write_text(json.dumps(manifest, indent=1))
    log.info("repository ready: %s", repo)
    return repo
