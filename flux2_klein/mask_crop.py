"""`padding_mask_crop`: inpaint only a box around the mask, then paste the result back. No transport here.

Flux2KleinInpaintPipeline (diffusers v0.42.1) with `padding_mask_crop=pad` does three things beyond plain
inpainting, and this module is the one home of each:

1. `crop_region`: the box holding every non-zero pixel of the mask, grown by `pad` on each side (clipped to
   the picture) and then widened along one axis to the output's aspect ratio (kept inside the picture);
   `VaeImageProcessor.get_crop_region`.
2. `fill_resize`: the picture and the mask are cut to that box and scaled, aspect kept, to the output size;
   the bars left over are filled by stretching the scaled image's edge rows (or columns); the processor's
   `resize_mode="fill"` (`_resize_and_fill`). The sampler then inpaints these, as without a crop.
3. `overlay`/`paste_back`: after decoding, the generated picture is cut to the box's size and put at the box
   on a black canvas, and the kept part of the original picture (its pixels where the mask is black,
   partly where grey, RGBA with premultiplied alpha as Pillow's "RGBa" mode keeps it) is laid over it;
   `VaeImageProcessor.apply_overlay`. The output keeps the picture's size.

One thing is reproduced as diffusers has it, for parity, though it is not what the crop is meant to do:
Flux2ImageProcessor overrides the resize `apply_overlay` calls (`resize_mode="crop"`) with a plain centre
crop, so the pasted box holds the generated picture's centre at 1:1 rather than the whole picture scaled
down to the box (pipelines/flux2/image_processor.py `_resize_and_crop`). Where the box is the whole
picture (a mask touching opposite edges) the two agree.

Pillow is imported inside the functions: the sampler and the leaves import this package without it.
"""

from __future__ import annotations

import numpy as np

Box = tuple[int, int, int, int]  # (left, top, right, bottom), as PIL's crop takes it


def _grow(lo: int, hi: int, want: float, limit: int) -> tuple[int, int]:
    """[lo, hi) widened to `want` pixels (the shortfall truncated to an int, split half before, half after)
    and shifted back inside [0, limit)."""
    short = int(want - (hi - lo))
    lo -= short // 2
    hi += short - short // 2
    if hi >= limit:  # past the far edge: slide back
        lo, hi = lo - (hi - limit), limit
    if lo < 0:  # past the near edge: slide forward, then clip
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def crop_region(mask, width: int, height: int, pad: int) -> Box | None:
    """The box of `mask` (PIL, any mode; its grayscale is read) to inpaint at `width` x `height`; None for a
    mask without a non-zero pixel (no box: diffusers would divide by zero)."""
    gray = np.asarray(mask.convert("L"))
    h, w = gray.shape
    cols = np.flatnonzero(gray.any(axis=0))
    rows = np.flatnonzero(gray.any(axis=1))
    if cols.size == 0:
        return None
    x1, x2 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w)
    y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, h)
    aspect = width / height
    if (x2 - x1) / (y2 - y1) > aspect:  # too wide for the output: take more rows
        y1, y2 = _grow(y1, y2, (x2 - x1) / aspect, h)
    else:
        x1, x2 = _grow(x1, x2, (y2 - y1) * aspect, w)
    return x1, y1, x2, y2


def fill_resize(image, width: int, height: int):
    """`image` (PIL) scaled with its aspect kept (Lanczos) to fit `width` x `height`, centred on an RGB canvas,
    the bars on either side filled with the scaled image's first and last row (or column) stretched."""
    from PIL import Image

    wide = width / height < image.width / image.height
    tall = width / height > image.width / image.height
    # The side that fits exactly, and the other scaled with it (floored).
    fit_w = width if wide else image.width * height // image.height
    fit_h = image.height * width // image.width if wide else height
    scaled = image.resize((fit_w, fit_h), resample=Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, box=(width // 2 - fit_w // 2, height // 2 - fit_h // 2))
    if wide:  # bars above and below
        bar = height // 2 - fit_h // 2
        if bar > 0:
            canvas.paste(scaled.resize((width, bar), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(scaled.resize((width, bar), box=(0, scaled.height, width, scaled.height)),
                         box=(0, bar + fit_h))
    elif tall:  # bars left and right
        bar = width // 2 - fit_w // 2
        if bar > 0:
            canvas.paste(scaled.resize((bar, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(scaled.resize((bar, height), box=(scaled.width, 0, scaled.width, height)),
                         box=(bar + fit_w, 0))
    return canvas


def overlay(picture, mask) -> np.ndarray:
    """What is kept of `picture` (PIL), uint8 RGBA [H, W, 4]: its pixels weighted by the inverted mask (PIL of
    the same size: black keeps, white repaints), through Pillow's premultiplied "RGBa" and back."""
    from PIL import Image, ImageOps

    kept = Image.new("RGBa", picture.size)
    kept.paste(picture.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return np.ascontiguousarray(np.asarray(kept.convert("RGBA"), dtype=np.uint8))


def paste_back(generated: np.ndarray, kept: np.ndarray, box: Box) -> np.ndarray:
    """The picture answered for a cropped inpaint: `generated` (uint8 [H, W, 3], the decoded output) cut to the
    box's size around its centre, placed at `box` on black, with `kept` (`overlay`'s RGBA) laid over it."""
    from PIL import Image

    x1, y1, x2, y2 = (int(v) for v in box)
    height, width = kept.shape[:2]
    out = Image.fromarray(np.ascontiguousarray(generated, dtype=np.uint8), "RGB")
    left, top = (out.width - (x2 - x1)) // 2, (out.height - (y2 - y1)) // 2
    centre = out.crop((left, top, left + x2 - x1, top + y2 - y1))
    canvas = Image.new("RGBA", (width, height))
    canvas.paste(centre, (x1, y1))
    canvas = canvas.convert("RGB").convert("RGBA")
    canvas.alpha_composite(Image.fromarray(np.ascontiguousarray(kept), "RGBA"))
    return np.ascontiguousarray(np.asarray(canvas.convert("RGB"), dtype=np.uint8))


def pack(box: Box | None, kept: np.ndarray | None) -> dict[str, np.ndarray]:
    """The postprocess model's inputs from preprocess (triton_config.POSTPROCESS_INPUTS): the box and the
    overlay, or zeros and an empty overlay without a crop (the image then passes unchanged)."""
    if box is None:
        return {"crop_box": np.zeros(4, np.int32), "overlay": np.zeros((0, 0, 4), np.uint8)}
    return {"crop_box": np.asarray(box, np.int32), "overlay": np.ascontiguousarray(kept, dtype=np.uint8)}
