"""The `flux2-klein` command (CONTRACT.md section 2)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .contract import PRECISIONS, RUNTIMES, TENSORRT_PRECISION
from .dtypes import COMPUTE_DTYPES
from .lora_library import LIBRARY_ENV as LORA_LIBRARY_ENV
from .repository import COMPILE_MODES
from .progress import log, setup_logging


def _tiny(args) -> int:
    from .tiny import make_full_size, make_tiny

    if args.config:
        from .configs import config_path

        make_full_size(Path(args.out), config_path(args.config), seed=args.seed)
    else:
        make_tiny(Path(args.out), seed=args.seed, distilled=not args.base)
    return 0


def _export_onnx(args) -> int:
    from .export.onnx_export import export_onnx

    networks = tuple(args.networks.split(",")) if args.networks else None
    kwargs = {"networks": networks} if networks else {}
    paths = export_onnx(args.checkpoint, args.out, dtype=args.dtype, **kwargs)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def _export_fp8(args) -> int:
    from .export.fp8 import export_fp8, load_prompts

    prompts = load_prompts(Path(args.prompts), limit=args.limit or None) if args.prompts else \
        load_prompts(limit=args.limit or None)
    print(export_fp8(args.checkpoint, args.out, dtype=args.dtype, prompts=prompts, steps=args.steps or None))
    return 0


def _geometry(args):
    """The checkpoint, or for a dry run the geometry of a config file (no weights needed)."""
    from .checkpoint import checkpoint_from_config, load_checkpoint

    if getattr(args, "config", ""):
        from .configs import config_path

        return checkpoint_from_config(config_path(args.config))
    if not args.checkpoint:
        raise ValueError("checkpoint: required (or --config 4b|FILE with --dry-run)")
    return load_checkpoint(args.checkpoint)


def _export_engines(args) -> int:
    from .export.tensorrt.build import build_engine
    from .export.tensorrt.plan import describe_plan, engine_plans

    ckpt, out, work = _geometry(args), Path(args.out), Path(args.onnx)
    if args.dry_run:
        print(describe_plan(ckpt, out, work, args.precision, args.opt_level))
        return 0
    for plan in engine_plans(ckpt, out, work, args.precision, args.opt_level):
        build_engine(plan, force=args.force)
    return 0


def _build(args) -> int:
    from .repository import build_repository

    if args.runtime == "tensorrt" or args.dry_run:
        from .export.tensorrt.plan import default_work, describe_plan

        work = Path(args.work) if args.work else default_work(args.out)
        if args.dry_run:
            if args.runtime != "tensorrt":
                raise ValueError("dry-run: only --runtime tensorrt has a build plan to show")
            print(describe_plan(_geometry(args), Path(args.out), work, args.precision or TENSORRT_PRECISION,
                                args.opt_level))
            return 0
        build_repository(args.checkpoint, args.out, runtime="tensorrt", precision=args.precision or TENSORRT_PRECISION,
                         work=work, opt_level=args.opt_level, batching=_batching(args), guardrail=_guardrail(args),
                         loras=args.lora, padding_mask_crop=args.padding_mask_crop,
                         lora_library=args.lora_library or None)
        return 0
    torch_only = {"fp8_text_encoder": args.fp8_text_encoder, "warm_sizes": args.warm_sizes} \
        if args.runtime == "torch" else {}
    build_repository(args.checkpoint, args.out, runtime=args.runtime, dtype=args.dtype,
                     onnx_dir=args.onnx or None, device=args.device, compile=args.compile,
                     precision=args.precision, batching=_batching(args), guardrail=_guardrail(args), loras=args.lora,
                     padding_mask_crop=args.padding_mask_crop, lora_library=args.lora_library or None, **torch_only)
    return 0


def _add_geometry(parser: argparse.ArgumentParser) -> None:
    """A checkpoint, or with --dry-run only its component configs: what `_geometry` reads."""
    parser.add_argument("--checkpoint", default="", help="checkpoint in diffusers layout")
    parser.add_argument("--config", default="", metavar="4b|FILE",
                        help="with --dry-run: component configs instead of a checkpoint (`4b`: the real model's)")


def _lora_spec(text: str):
    from .lora import LoraError, LoraSpec

    try:
        return LoraSpec.parse(text)
    except LoraError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _guardrail(args):
    from .guardrail import load_settings

    return load_settings(args.guardrail or None)  # the file, else FLUX2_KLEIN_GUARDRAIL*, else the defaults


def _batching(args):
    from .triton_config import Batching

    return Batching(max_requests=args.max_batch, max_dit_rows=2 * args.max_batch, queue_delay_us=args.batch_delay_us)


def _serve(args) -> int:
    from .server import serve

    code = serve(args.repository, args.http_port, args.grpc_port, args.metrics_port, address=args.address,
                 grace_s=args.grace)
    if code not in (0, -15):
        log.error("tritonserver exited with status %d (its log above says why)", code)
    return 0 if code in (0, -15) else (code if code > 0 else 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flux2-klein", description="Serve FLUX.2 [klein] on NVIDIA Triton.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny", help="write a tiny random-weight checkpoint of the real architecture")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    t.add_argument("--base", action="store_true",
                   help="an undistilled 'base' checkpoint (guidance with an empty negative prompt)")
    t.add_argument("--config", default="", metavar="4b|FILE",
                   help="instead of the tiny geometry, random bf16 weights of these component configs: `4b` "
                        "(the real model's, shipped in the package) or a JSON file; for full-size checks")
    t.set_defaults(func=_tiny)

    e = sub.add_parser("export", help="export steps: onnx, fp8, engines")
    esub = e.add_subparsers(dest="what", required=True)
    o = esub.add_parser("onnx", help="export every network to ONNX, ready for TensorRT")
    o.add_argument("--checkpoint", required=True, help="checkpoint in diffusers layout")
    o.add_argument("--out", required=True, help="output directory: one folder per network")
    o.add_argument("--dtype", choices=tuple(COMPUTE_DTYPES), default="fp32",
                   help="compute precision inside the graphs (I/O stays float32; default fp32)")
    o.add_argument("--networks", default="",
                   help="comma-separated subset of text_encoder,transformer,vae_decoder,vae_encoder")
    o.set_defaults(func=_export_onnx)

    f = esub.add_parser("fp8", help="FP8 (E4M3) DiT: ModelOpt calibration on the real pipeline, ONNX with Q/DQ")
    f.add_argument("--checkpoint", required=True, help="checkpoint in diffusers layout")
    f.add_argument("--out", required=True, help="output directory (writes transformer/model.onnx)")
    f.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="precision of everything that is not an FP8 GEMM (default bf16; fp32 to check on a CPU)")
    f.add_argument("--prompts", default="", help="calibration prompts, one a line (default: the shipped set)")
    f.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    f.add_argument("--steps", type=int, default=0, help="denoising steps while calibrating (default: the checkpoint's)")
    f.set_defaults(func=_export_fp8)

    g = esub.add_parser("engines", help="TensorRT engines from exported graphs, with the specs' profiles")
    _add_geometry(g)
    g.add_argument("--onnx", required=True, help="work folder holding bf16/<network> and fp8/transformer graphs")
    g.add_argument("--out", required=True, help="repository-shaped output: <network>/1/model.plan")
    g.add_argument("--precision", choices=PRECISIONS, default=TENSORRT_PRECISION)
    g.add_argument("--opt-level", type=int, default=None, help="builder optimization level (default 3)")
    g.add_argument("--force", action="store_true", help="rebuild even fresh engines")
    g.add_argument("--dry-run", action="store_true", help="print the plan and trtexec equivalents; needs no TensorRT")
    g.set_defaults(func=_export_engines)

    b = sub.add_parser("build", help="export and assemble a ready Triton model repository")
    _add_geometry(b)
    b.add_argument("--out", required=True, help="the model repository to write")
    b.add_argument("--runtime", choices=RUNTIMES, default=RUNTIMES[0],
                   help="what runs the leaf networks (default onnxruntime: Python models, CPU; torch: the "
                        "diffusers/transformers modules in PyTorch, no export; tensorrt: engines for this GPU)")
    b.add_argument("--device", choices=("cpu", "gpu"), default=None,
                   help="onnxruntime/torch: where the models' instances run (default cpu)")
    b.add_argument("--compile", nargs="?", const="default", default="",
                   choices=COMPILE_MODES,
                   help="torch: run the leaves under torch.compile (optionally a mode)")
    b.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="tensorrt, torch on a GPU: the DiT's GEMMs in FP8 or BF16 (default fp8 on tensorrt, "
                        "bf16 on torch)")
    b.add_argument("--fp8-text-encoder", action="store_true", help="torch on a GPU: the text encoder's GEMMs in FP8 too")
    b.add_argument("--warm-sizes", default=None, metavar="all|WxH,...",
                   help="torch: sizes each leaf runs once while loading, so no request pays for a compile "
                        "(default: all when compiling on a GPU, 1024x1024 on a GPU, none on a CPU)")
    b.add_argument("--padding-mask-crop", action="store_true",
                   help="serve inpainting's padding_mask_crop: adds the postprocess model (its paste back) to "
                        "every request's path, ~9 ms a request on a 2-core CPU (default: the input is refused)")
    b.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", type=_lora_spec,
                   help="a diffusers-format klein LoRA fused into the weights before anything else, at SCALE "
                        "(default 1); repeatable, fused in order")
    b.add_argument("--lora-library", default=os.environ.get(LORA_LIBRARY_ENV, ""), metavar="DIR",
                   help="torch: a folder of <name>.safetensors LoRAs each request may pick from by its `loras` "
                        f"input, unfused (default ${LORA_LIBRARY_ENV}; every file checked before the build)")
    b.add_argument("--guardrail", default="", metavar="FILE",
                   help="guardrail settings, JSON or TOML (docs/GUARDRAIL.md; default: FLUX2_KLEIN_GUARDRAIL* "
                        "variables, else the prompt check with the shipped blocklist)")
    b.add_argument("--max-batch", type=int, default=4, metavar="N",
                   help="requests of one shape the sampler runs as one denoising loop (default 4)")
    b.add_argument("--batch-delay-us", type=int, default=0, metavar="US",
                   help="how long a request may wait for others to batch with (default 0: only those queued)")
    b.add_argument("--work", default="", help="tensorrt: folder for ONNX graphs and the timing cache "
                                              "(default: REPO.work beside the repository)")
    b.add_argument("--opt-level", type=int, default=None, help="tensorrt: builder optimization level (default 3)")
    b.add_argument("--dry-run", action="store_true",
                   help="tensorrt: print the plan (graphs, precisions, profiles, engines, trtexec commands)")
    b.add_argument("--dtype", choices=tuple(COMPUTE_DTYPES), default=None,
                   help="compute precision (default bf16 for --runtime torch --device gpu, else fp32)")
    b.add_argument("--onnx", default="", help="reuse graphs already written by `export onnx` to this folder")
    b.set_defaults(func=_build)

    s = sub.add_parser("serve", help="run Triton Inference Server on a repository, in the foreground")
    s.add_argument("--repository", required=True, help="a repository written by `flux2-klein build`")
    s.add_argument("--http-port", type=int, default=8000, metavar="N", help="Triton's HTTP/REST port (default 8000)")
    s.add_argument("--grpc-port", type=int, default=8001, metavar="N",
                   help="Triton's gRPC port, the one `generate` and the gateway use (default 8001)")
    s.add_argument("--metrics-port", type=int, default=8002, metavar="N",
                   help="Triton's Prometheus metrics port (default 8002)")
    s.add_argument("--address", default="127.0.0.1", metavar="ADDR",
                   help="the interface Triton's ports bind (default 127.0.0.1; 0.0.0.0 exposes Triton's own API, "
                        "which has requests that abort it: put the gateway in front instead)")
    s.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds for requests in flight to finish before Triton stops (default 30)")
    s.set_defaults(func=_serve)

    from .client.generate import add_generate_parser

    add_generate_parser(sub)

    from .client.gateway import add_gateway_parser

    add_gateway_parser(sub)

    from .client.bench import add_bench_parser

    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from .checkpoint import CheckpointError
    from .export.tensorrt.library import BuildError

    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError, BuildError) as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
