"""`flux2-klein generate` (CONTRACT.md section 2): one image through tritonclient.

    flux2-klein generate --prompt TEXT [--size WxH] [--seed N] [--steps N] [--guidance F]
                         [--reference FILE]... [--image FILE [--mask FILE [--padding-mask-crop N]] [--strength F]]
                         [--url HOST:PORT] [--protocol grpc|http] [--wait S] --out FILE

Options left out are not sent, so the server's defaults apply (1024x1024, seed 0, the checkpoint's
steps and guidance). The server judges every value; a bad one (an unsupported size, steps out of range,
too many or undecodable references) comes back as its message on stderr and exit status 2. Exit status 1:
the server could not be reached (after waiting --wait seconds for it, 180 by default, saying so on
stderr every few seconds), timed out or failed. 0: the image was written; stdout gets one line,
"<path>\t<seconds> s", the seconds being the request's round trip.
"""

from __future__ import annotations

import argparse
import sys
import time

from flux2_klein import contract as api
from flux2_klein.sizes import DEFAULT_SIZE, MAX_REFERENCES, size_names
from flux2_klein.sizes import size_argument as parse_size  # --size's type: sizes.parse_size for argparse

# `serve` of the CPU demo loads its models in 26-37 s on 2 idle CPUs, over 120 s on a busy machine.
DEFAULT_WAIT_S = 180.0


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `generate` subcommand on an argparse subparsers object; its func is run_generate."""
    from .images import EXTENSIONS
    from .triton_client import DEFAULT_URLS, PROTOCOLS

    g = subparsers.add_parser(
        "generate",
        help="generate one image through tritonclient",
        description=f"Generate one image with the Triton model {api.MODEL_NAME}. Options left out take the server's "
                    "defaults.",
    )
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the text prompt (UTF-8)")
    g.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                   help=f"output WIDTHxHEIGHT (default {DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}, or with --reference the "
                        f"size nearest the first reference's aspect ratio); one of {size_names()}")
    g.add_argument("--seed", type=int, default=None, metavar="N", help=f"noise seed (default {api.DEFAULT_SEED})")
    g.add_argument("--steps", type=int, default=None, metavar="N",
                   help=f"denoising steps, {api.MIN_STEPS}..{api.MAX_STEPS} (default: {api.DEFAULT_STEPS_DISTILLED} "
                        f"for distilled checkpoints, {api.DEFAULT_STEPS_BASE} for base)")
    g.add_argument("--guidance", type=float, default=None, metavar="F",
                   help=f"guidance scale (default: {api.DEFAULT_GUIDANCE_DISTILLED}, ignored, for distilled "
                        f"checkpoints; {api.DEFAULT_GUIDANCE_BASE} for base)")
    g.add_argument("--reference", action="append", default=[], metavar="FILE",
                   help=f"a reference image (PNG, JPEG, WebP) for editing; repeat for up to {MAX_REFERENCES}")
    g.add_argument("--image", default=None, metavar="FILE",
                   help="the picture to change (PNG, JPEG, WebP): image-to-image, or inpainting with --mask; "
                        "served at --size, or the size nearest its aspect ratio")
    g.add_argument("--mask", default=None, metavar="FILE",
                   help="inpainting mask, the image's size: white repaints, black keeps (needs --image)")
    g.add_argument("--strength", type=float, default=None, metavar="F",
                   help=f"how much of --image to change, 0..1 (default {api.DEFAULT_STRENGTH}; 1: from pure noise)")
    g.add_argument("--padding-mask-crop", type=int, default=None, metavar="N",
                   help="inpaint only the box around the mask grown by N pixels (scaled up to the size, then "
                        "pasted back), as diffusers' padding_mask_crop (needs --mask)")
    g.add_argument("--loras", default=None, metavar="NAME[:SCALE],...",
                   help="LoRAs of the server's library for this image, e.g. style:0.8,detail (a repository "
                        "built with --lora-library)")
    g.add_argument("--url", default=None, metavar="HOST:PORT",
                   help=f"Triton's endpoint (default {DEFAULT_URLS['grpc']} for grpc, {DEFAULT_URLS['http']} for http)")
    g.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="grpc (default) or http")
    g.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, metavar="S",
                   help=f"wait up to S seconds for Triton and the model to be ready, e.g. just after `serve` "
                        f"started (default {DEFAULT_WAIT_S:g}; 0: fail at once)")
    g.add_argument("--out", required=True, metavar="FILE",
                   help=f"image to write; the extension picks the format: {', '.join(EXTENSIONS)}")
    g.set_defaults(func=run_generate)
    return g


def run_generate(args: argparse.Namespace) -> int:
    """Run `generate` for parsed arguments: 0 written, 2 a bad request, 1 any other failure."""
    from .images import image_format, read_reference, save_image
    from .triton_client import Flux2KleinClient, GenerationError, default_url

    # Everything we can judge locally, before the server spends time on the image.
    try:
        image_format(args.out)
        references = [read_reference(path) for path in args.reference]
        image = None if args.image is None else read_reference(args.image)
        mask = None if args.mask is None else read_reference(args.mask)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width, height = args.size if args.size is not None else (None, None)
    url = args.url or default_url(args.protocol)

    try:
        with Flux2KleinClient(url, protocol=args.protocol) as client:
            if args.wait > 0:
                client.wait_until_ready(args.wait, on_wait=lambda waited, why: print(
                    f"waiting for Triton ({waited:.0f} s of {args.wait:g} s): {why}", file=sys.stderr, flush=True))
            start = time.perf_counter()
            image = client.generate(
                args.prompt, width=width, height=height, seed=args.seed, steps=args.steps,
                guidance=args.guidance, references=references, image=image, mask=mask, strength=args.strength,
                padding_mask_crop=args.padding_mask_crop, loras=args.loras,
            )
            elapsed = time.perf_counter() - start
    except GenerationError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2 if e.invalid_argument else 1
    except (ValueError, TypeError) as e:  # a value no tensor of the contract's type can hold, e.g. a huge seed
        print(f"error: {e}", file=sys.stderr)
        return 2

    try:
        path = save_image(image, args.out)
    except OSError as e:
        print(f"error: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"{path}\t{elapsed:.2f} s")
    return 0


__all__ = ["add_generate_parser", "run_generate", "parse_size"]
