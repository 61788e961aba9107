"""The 17 output sizes FLUX.2 [klein] supports, and the geometry that follows from them.

Every other module derives its shape ranges from here, so a size added or removed changes the
ONNX sample shapes, the TensorRT profiles and the Triton validation together.
"""

from __future__ import annotations

import math
import re

# (width, height), as CONTRACT.md section 3 lists them: about one megapixel each, sides multiples of 16.
SIZES: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
)
DEFAULT_SIZE = (1024, 1024)

# A latent token covers 16x16 pixels: the VAE downsamples 8x (2 ** (levels - 1) with 4 levels) and
# the transformer sees 2x2 latent patches packed into one token.
PIXELS_PER_TOKEN_SIDE = 16

# Reference images, as diffusers' Flux2KleinPipeline and Flux2ImageProcessor.check_image_input treat them.
MAX_REFERENCES = 4
REFERENCE_MAX_AREA = 1024 * 1024  # larger images are resized (Lanczos) to this area
REFERENCE_MIN_SIDE = 64
REFERENCE_MAX_ASPECT = 8
# The longest side a reference can keep: aspect ratio 8 at the maximum area, floored to 16.
REFERENCE_MAX_SIDE = (int(math.sqrt(REFERENCE_MAX_AREA * REFERENCE_MAX_ASPECT)) // 16) * 16

TEXT_TOKENS = 512  # the pipeline pads and truncates every prompt to 512 tokens


def size_names() -> str:
    return ", ".join(f"{w}x{h}" for w, h in SIZES)


def latent_grid(width: int, height: int) -> tuple[int, int]:
    """(rows, cols) of image tokens for an image of width x height pixels."""
    return height // PIXELS_PER_TOKEN_SIDE, width // PIXELS_PER_TOKEN_SIDE


def image_tokens(width: int, height: int) -> int:
    rows, cols = latent_grid(width, height)
    return rows * cols


def reference_token_bounds() -> tuple[int, int]:
    """Fewest and most tokens a single preprocessed reference image can have."""
    side = REFERENCE_MIN_SIDE // PIXELS_PER_TOKEN_SIDE
    return side * side, REFERENCE_MAX_AREA // PIXELS_PER_TOKEN_SIDE**2


_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_size(text: str, field: str = "size") -> tuple[int, int]:
    """"WIDTHxHEIGHT" in pixels, both sides positive ("1024x1024", " 944 X 1104 ") -> (width, height); any
    size, checked against SIZES where that matters. ValueError naming `field` otherwise."""
    m = _SIZE.match(text)
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise ValueError(f"{field}: {text!r} is not WIDTHxHEIGHT in pixels (e.g. 1024x1024)")
    return int(m.group(1)), int(m.group(2))


def size_argument(text: str) -> tuple[int, int]:
    """parse_size as an argparse type: its message becomes argparse's (a ValueError would become
    "invalid value")."""
    import argparse

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
