"""What preprocess hands the sampler for one request, and how the sampler reads it back: no transport here.

The sampler is a batching Triton model, so each of these tensors carries a leading batch dimension of 1
(`SAMPLER_INPUTS` in triton_config.py states the names, dtypes and shapes without it; `pack` follows it).
References of different sizes travel as one byte run and their shapes (`pack_references`). The guidance decision is
made once, in preprocess, and travels as the named flag `guided`; under guidance the sampler also gets the
empty negative prompt's tokens, which it encodes once and keeps. With an `image` (inpainting, image-to-image)
the picture travels as its pixels at the output size and the mask as the pipeline's per-token mask (computed
here, on the CPU, where the pipeline computes it); without one both are empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .contract import strength_steps
from .lora_library import choice_of_tensor, format_choice
from .sampling import Shape, mask_tokens
from .sizes import latent_grid
from .triton_config import SAMPLER_INPUTS


@dataclass
class SamplerRequest:
    """One request as the sampler sees it (the prompt's embedding travels separately, from the text encoder)."""

    width: int
    height: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    guided: bool
    references: list[np.ndarray]  # uint8 [H, W, 3] each, already resized as the pipeline resizes them
    negative_input_ids: np.ndarray  # int64 [1, 512]
    negative_attention_mask: np.ndarray
    image: np.ndarray | None = None  # uint8 [height, width, 3], inpainting / image-to-image
    mask: np.ndarray | None = None  # float32 [h*w, 1] (sampling.mask_tokens); None: all repainted
    strength: float = 1.0
    loras: tuple[tuple[str, float], ...] = ()  # lora_library.parse_choice's pairs

    @property
    def start_step(self) -> int | None:
        return None if self.image is None else strength_steps(self.num_inference_steps, self.strength)[0]

    @property
    def shape(self) -> Shape:
        grids = tuple(latent_grid(r.shape[1], r.shape[0]) for r in self.references)
        return Shape(self.width, self.height, self.num_inference_steps, self.guided, grids, self.start_step,
                     self.loras)


def pack(req, guided: bool, negative: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """The sampler's inputs for a validated request (request.Request), each with its leading batch of 1.

    `negative` is the empty prompt's (input_ids, attention_mask), [1, 512] each."""
    pixels, shapes = pack_references(req.references)
    ids, mask = negative
    values = {
        "height": req.height, "width": req.width, "seed": req.seed, "num_inference_steps": req.num_inference_steps,
        "guidance_scale": req.guidance_scale, "guided": guided, "strength": req.strength,
        "reference_pixels": pixels, "reference_shapes": shapes,
        "negative_input_ids": ids.reshape(-1), "negative_attention_mask": mask.reshape(-1),
        "image_pixels": np.zeros(0, np.uint8) if req.image is None else np.ascontiguousarray(req.image).reshape(-1),
        "mask_tokens": (np.zeros(0, np.float32) if req.mask is None
                        else mask_tokens(req.mask).numpy().reshape(-1)),
        "loras": format_choice(req.loras).encode("utf-8"),
    }
    # The names, dtypes and order are SAMPLER_INPUTS' (triton_config.py, the sampler's config), stated there once.
    return {t.name: _array(values[t.name], t.dtype) for t in SAMPLER_INPUTS}


def _array(value, dtype: str) -> np.ndarray:
    """One sampler input with its leading batch of 1; BYTES as a numpy object array (what Triton takes)."""
    if dtype == "bytes":
        array = np.empty((1, 1), dtype=np.object_)
        array[0, 0] = value
        return array
    return np.asarray(value, dtype=dtype).reshape(1, *np.shape(value) or (1,))


def unpack(arrays: dict[str, np.ndarray]) -> SamplerRequest:
    """Inverse of `pack` for one request's arrays (each [1, ...], as Triton hands a batch-of-one request)."""
    scalar = lambda name: arrays[name].reshape(-1)[0].item()  # noqa: E731
    return SamplerRequest(
        width=int(scalar("width")), height=int(scalar("height")), seed=int(scalar("seed")),
        num_inference_steps=int(scalar("num_inference_steps")), guidance_scale=float(scalar("guidance_scale")),
        guided=bool(scalar("guided")),
        references=unpack_references(arrays["reference_pixels"].reshape(-1), arrays["reference_shapes"].reshape(-1, 2)),
        negative_input_ids=arrays["negative_input_ids"].reshape(1, -1),
        negative_attention_mask=arrays["negative_attention_mask"].reshape(1, -1),
        loras=choice_of_tensor(arrays["loras"]),
        **_picture(arrays, int(scalar("width")), int(scalar("height"))),
    )


def _picture(arrays: dict[str, np.ndarray], width: int, height: int) -> dict:
    """The inpainting fields of `unpack`: the picture [height, width, 3] and the mask [h*w, 1], or None."""
    pixels = arrays["image_pixels"].reshape(-1)
    if pixels.size == 0:
        return {}
    if pixels.size != width * height * 3:
        raise ValueError(f"image_pixels: {pixels.size} bytes, a {width}x{height} picture has {width * height * 3}")
    tokens = arrays["mask_tokens"].reshape(-1, 1)
    rows, cols = latent_grid(width, height)
    if tokens.size not in (0, rows * cols):
        raise ValueError(f"mask_tokens: {tokens.size} values, a {cols}x{rows} token grid has {rows * cols}")
    return {"image": pixels.reshape(height, width, 3), "mask": tokens if tokens.size else None,
            "strength": float(arrays["strength"].reshape(-1)[0])}


# ------------------------------------------------------------------------------ references, packed


def pack_references(references: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A variable number of differently sized images as two tensors a Triton ensemble can carry:
    every image's bytes end to end (uint8 [total]) and their (height, width) (int32 [n, 2])."""
    shapes = np.array([r.shape[:2] for r in references], dtype=np.int32).reshape(len(references), 2)
    pixels = (np.concatenate([r.reshape(-1) for r in references]) if references
              else np.zeros((0,), dtype=np.uint8))
    return pixels, shapes


def unpack_references(pixels: np.ndarray, shapes: np.ndarray) -> list[np.ndarray]:
    """Inverse of `pack_references`: views into `pixels`, uint8 [H, W, 3] each."""
    out, start = [], 0
    for height, width in np.asarray(shapes).reshape(-1, 2):
        n = int(height) * int(width) * 3
        if start + n > pixels.size:
            raise ValueError(f"reference_pixels: {pixels.size} bytes, shapes need more than {start + n}")
        out.append(pixels[start:start + n].reshape(int(height), int(width), 3))
        start += n
    if start != pixels.size:
        raise ValueError(f"reference_pixels: {pixels.size} bytes, shapes account for {start}")
    return out
