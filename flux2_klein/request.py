"""One request of the Triton model `flux2_klein`, validated and prepared, free of any transport.

The Triton Python-backend "preprocess" model (and `DirectPipeline`) wraps this module: it turns the
request's tensors into a `Request` (validated, with the contract's defaults applied, CONTRACT.md
section 3, `contract.py`), decodes and
preprocesses the reference images exactly as diffusers' `Flux2KleinPipeline.__call__` does ("4. process
images"), and tokenizes the prompt exactly as `Flux2KleinPipeline._get_qwen3_prompt_embeds` does. Every
caller mistake raises `InvalidInput`, whose message names the input and what is allowed; the wrapper
answers it with INVALID_ARGUMENT / HTTP 400.

(Over 400 lines: one request's validation and its three kinds of picture - references, the picture to change,
its mask - read one way, together.)

Decisions beyond the contract's table:

* `guidance_scale` must be a finite number >= 0; NaN, +-inf and negative values are rejected (diffusers
  would silently produce NaN or an inverted guidance). It is validated for distilled checkpoints too,
  even though they ignore it, so that a request is valid or not independently of the checkpoint.
* `seed` may be any INT64, negative included (`torch.Generator.manual_seed` accepts the whole range).
* With reference images and neither `height` nor `width`, the size is the supported one nearest in aspect
  ratio to the first reference as sent (`contract.size_for_reference`), not 1024x1024: an edit keeps its
  shape. One of the two alone still means the other's default.
* `prompt` given as "" is valid (it is also the base model's negative prompt); a missing prompt, or one
  sent with an empty shape, is an error. Like diffusers we keep the first 512 tokens (chat template
  included), but a prompt over `MAX_PROMPT_CHARS` characters is refused before tokenizing: no 512 tokens
  span that much text, and tokenizing 60 MiB took a minute and 10 GB.
* References are decoded as the pipeline sees `PIL.Image.open(file)`: the first frame of an animated
  PNG/WebP, no EXIF orientation applied, no ICC colour management, alpha dropped (not composited) by
  `convert("RGB")`. Files over `MAX_DECODE_PIXELS` are refused before their pixels are decoded.
* `init_image` (inpainting, image-to-image: `Flux2KleinInpaintPipeline`'s `image`, diffusers v0.42.1) is
  served at one of the 17 sizes: `width`/`height` when given, else the one nearest in aspect ratio to the image as sent. An
  image of another size is first resized to it (one Lanczos resize in its decoded mode), and so is its
  mask; from there every rule is the pipeline's, so the picture equals the pipeline's for the resized
  image. (The pipeline itself would keep the image's own size floored to 16, after shrinking it to 1 MP:
  for an image already at one of the 13 sizes up to 1 MP that is the same size, and the same picture.)
  The mask must have the image's size as sent; it is binarized as the pipeline's mask processor does
  (grayscale, then >= 0.5 of 255 repaints). Without a mask the whole picture is repainted (the pipeline
  with an all-white mask). The image rides as the first condition, so at most 3 references go with it.
  `padding_mask_crop` (>= 0, with a mask that has a non-zero pixel) inpaints the box around the mask as the
  pipeline does (flux2_klein/mask_crop.py): the box is found on the mask at the output size, picture and mask
  are cut to it and scaled back to the output size, and after decoding the `postprocess` model pastes the
  result into the picture; the answer keeps the output size.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from flux2_klein.contract import (
    DEFAULT_STRENGTH, INPUTS, MAX_STEPS, MIN_STEPS, Defaults, size_for_reference, strength_steps,
)
from flux2_klein.dtypes import DATATYPES
from flux2_klein.lora_library import parse_choice
from flux2_klein.sizes import (
    MAX_REFERENCES,
    PIXELS_PER_TOKEN_SIDE,
    REFERENCE_MAX_AREA,
    REFERENCE_MAX_ASPECT,
    REFERENCE_MIN_SIDE,
    SIZES,
    TEXT_TOKENS,
    size_names,
)

# Decoding a reference costs memory in proportion to its pixels, whatever its file size (a small PNG can
# declare 50000x50000). Anything larger than this is refused from its header, before decoding: 64 MiP
# (8192x8192, or a 64-megapixel photo) decodes to at most 256 MiB as RGBA. Every reference is resized to
# about one megapixel anyway.
MAX_DECODE_PIXELS = 64 * 1024 * 1024
REFERENCE_FORMATS = ("PNG", "JPEG", "WEBP")


def _kserve_type(dtype: np.dtype) -> str | None:
    """Triton's (KServe's) name for a numpy dtype its backends hand over (dtypes.py), None for others."""
    return DATATYPES.get(np.dtype(dtype).name)


class InvalidInput(ValueError):
    """A caller's mistake in one input. `field` is the input's name (for the size pair, "height/width";
    for one reference, "reference_images[i]"); str() is the full message, starting with the field."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass
class Request:
    """One validated request. `references` are preprocessed uint8 RGB arrays [H, W, 3], sides multiples
    of 16, in request order: the VAE encoder's input is `2 * (ref.astype(float32) / 255) - 1`."""

    prompt: str
    width: int
    height: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    references: list[np.ndarray] = field(default_factory=list)
    # Inpainting / image-to-image: the picture to change, uint8 [height, width, 3] at the output size, and
    # its binarized mask, float32 [height, width] of 0 (keep) and 1 (repaint); None: all repainted.
    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    strength: float = DEFAULT_STRENGTH
    # padding_mask_crop: the box inpainted (left, top, right, bottom) and what is kept of the picture, uint8
    # RGBA [height, width, 4] (mask_crop.overlay), both for the paste after decoding; None without a crop.
    crop_box: tuple[int, int, int, int] | None = None
    overlay: np.ndarray | None = None
    # The LoRAs of the repository's library this request runs with, in its order (lora_library.py); () none.
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def start_step(self) -> int | None:
        """The first step of the schedule that runs (strength's cut); None without an image."""
        return None if self.image is None else strength_steps(self.num_inference_steps, self.strength)[0]


# --------------------------------------------------------------------------------------------- inputs


def _describe(array: np.ndarray) -> str:
    dtype = np.dtype(array.dtype)
    if dtype == np.object_ or dtype.kind in ("S", "U"):
        name = "BYTES"
    else:
        name = _kserve_type(dtype) or str(dtype)
    return f"{name} {list(array.shape)}"


def _check(name: str, value, expected: str, shape_ok) -> np.ndarray:
    """`value` as an ndarray of Triton type `expected` whose shape passes `shape_ok`, else InvalidInput."""
    want = "BYTES [N]" if name == "reference_images" else f"{expected} [1]"
    if not isinstance(value, np.ndarray):
        raise InvalidInput(name, f"expected {want}, got {type(value).__name__}")
    dtype = np.dtype(value.dtype)
    if expected == "BYTES":
        type_ok = dtype == np.object_ or dtype.kind in ("S", "U")
    else:
        type_ok = _kserve_type(dtype) == expected
    if not type_ok or not shape_ok(value.shape):
        raise InvalidInput(name, f"expected {want}, got {_describe(value)}")
    return value


# Each input's KServe type, from the contract.
_TYPES = {t.name: DATATYPES[t.dtype] for t in INPUTS}


def _scalar(inputs: Mapping[str, np.ndarray | None], name: str):
    value = inputs.get(name)
    if value is None:
        return None
    return _check(name, value, _TYPES[name], lambda shape: tuple(shape) == (1,))[0]


def _as_bytes(name: str, item) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, str):  # numpy may hand back str for an object array built from text
        return item.encode("utf-8", "surrogatepass")
    raise InvalidInput(name, f"expected BYTES, got an element of type {type(item).__name__}")


# Far above what 512 tokens can cover (a token is a few characters, rarely a few dozen); the gateway's bound too.
MAX_PROMPT_CHARS = 65536
_MAX_PROMPT_BYTES = 4 * MAX_PROMPT_CHARS  # UTF-8: at most 4 bytes a character


def _prompt_too_long(got: str) -> InvalidInput:
    return InvalidInput("prompt", f"at most {MAX_PROMPT_CHARS} characters (only the first 512 tokens are used); "
                                  f"got {got}")


def parse_prompt(value: np.ndarray | None) -> str:
    if value is None:
        raise InvalidInput("prompt", "required (BYTES [1], UTF-8 text; may be empty)")
    item = _check("prompt", value, "BYTES", lambda shape: tuple(shape) == (1,))[0]
    try:
        if isinstance(item, str):
            item.encode("utf-8")  # a str with lone surrogates is no UTF-8 text either
            text = str(item)
        else:
            raw = _as_bytes("prompt", item)
            if len(raw) > _MAX_PROMPT_BYTES:  # refused before decoding megabytes
                raise _prompt_too_long(f"{len(raw)} bytes")
            text = raw.decode("utf-8")
    except UnicodeError as e:
        raise InvalidInput("prompt", f"not valid UTF-8 (at {e.start}); send the prompt as UTF-8 text") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise _prompt_too_long(f"{len(text)} characters")
    return text


def parse_request(inputs: Mapping[str, np.ndarray | None], defaults: Defaults | None = None, *,
                  crop_served: bool = True, lora_names: tuple[str, ...] = ()) -> Request:
    """Validate a request's tensors, apply `defaults` (see `Defaults.for_checkpoint`) and decode the
    reference images. Inputs that are absent may be missing from `inputs` or map to None. `crop_served`:
    whether the repository pastes a padding_mask_crop result back (built with --padding-mask-crop);
    `lora_names`: the LoRAs its library serves (built with --lora-library)."""
    defaults = defaults or Defaults()
    prompt = parse_prompt(inputs.get("prompt"))
    loras = parse_loras(inputs.get("loras"), lora_names)

    height = _scalar(inputs, "height")
    width = _scalar(inputs, "width")
    # Neither given: the size follows the first reference (if any), chosen once its header is read below.
    size_from_reference = height is None and width is None
    height = defaults.height if height is None else int(height)
    width = defaults.width if width is None else int(width)
    if (width, height) not in SIZES:
        raise InvalidInput(
            "height/width",
            f"{width}x{height} (width x height) is not supported; allowed (width x height): {size_names()}",
        )

    seed = _scalar(inputs, "seed")
    seed = defaults.seed if seed is None else int(seed)

    steps = _scalar(inputs, "num_inference_steps")
    steps = defaults.num_inference_steps if steps is None else int(steps)
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise InvalidInput("num_inference_steps", f"must be {MIN_STEPS}..{MAX_STEPS}, got {steps}")

    guidance = _scalar(inputs, "guidance_scale")
    # float() of the float32 value: exactly what a client that sent FP32 would pass to diffusers.
    guidance = float(defaults.guidance_scale) if guidance is None else float(guidance)
    if not math.isfinite(guidance) or guidance < 0:
        raise InvalidInput("guidance_scale", f"must be a finite number >= 0, got {guidance}")

    image_value, mask_value = inputs.get("init_image"), inputs.get("mask_image")
    strength = _scalar(inputs, "strength")
    padding_mask_crop = _scalar(inputs, "padding_mask_crop")
    if image_value is None:
        for name, value in (("mask_image", mask_value), ("strength", strength), ("padding_mask_crop", padding_mask_crop)):
            if value is not None:
                raise InvalidInput(name, "needs `init_image`, the picture to change (BYTES [1], PNG, JPEG or WebP)")
    strength = DEFAULT_STRENGTH if strength is None else float(strength)
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise InvalidInput("strength", f"must be a number in 0..1, got {strength}")
    if image_value is not None and strength_steps(steps, strength)[1] < 1:
        raise InvalidInput("strength", f"{strength} leaves no denoising step of {steps} (the pipeline runs "
                                       f"the last int(steps * strength) of them, at least 1); raise strength "
                                       "or num_inference_steps")
    if padding_mask_crop is not None:
        if not crop_served:
            raise InvalidInput("padding_mask_crop", "not served by this repository: it was built without the "
                                                    "paste back after decoding; rebuild with `flux2-klein build "
                                                    "--padding-mask-crop` (one more model in every request's path)")
        padding_mask_crop = int(padding_mask_crop)
        if mask_value is None:
            raise InvalidInput("padding_mask_crop", "needs `mask_image`: the box is cut around the mask")
        if padding_mask_crop < 0:
            raise InvalidInput("padding_mask_crop", f"must be >= 0 (pixels around the mask), got {padding_mask_crop}")

    limit = MAX_REFERENCES - 1 if image_value is not None else MAX_REFERENCES
    references, sizes = _parse_references(inputs.get("reference_images"), limit)
    image = mask = crop = None
    if image_value is not None:
        picture = _open_single(image_value, "init_image")
        if size_from_reference:  # the picture being changed decides, as the first reference does for an edit
            width, height = size_for_reference(*picture.size)
        mask_pic = None
        if mask_value is not None:
            mask_pic = _open_single(mask_value, "mask_image", limits=False)
            if mask_pic.size != picture.size:
                raise InvalidInput("mask_image", f"{mask_pic.width}x{mask_pic.height} is not init_image's size "
                                                 f"{picture.width}x{picture.height}; send a mask of the image's size")
        image, mask, crop = prepare_image(picture, mask_pic, (width, height), padding_mask_crop)
    elif size_from_reference and sizes:
        width, height = size_for_reference(*sizes[0])
    return Request(
        prompt=prompt, width=width, height=height, seed=seed, num_inference_steps=steps,
        guidance_scale=guidance, references=references, image=image, mask=mask, strength=strength,
        crop_box=None if crop is None else crop[0], overlay=None if crop is None else crop[1], loras=loras,
    )


def parse_loras(value: np.ndarray | None, served: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """The `loras` input (BYTES [1], "name:scale,name") as (name, scale) pairs of the served library."""
    if value is None:
        return ()
    text = _as_bytes("loras", _check("loras", value, "BYTES", lambda shape: tuple(shape) == (1,))[0])
    if len(text) > 4096:  # MAX_PER_REQUEST names of 64 characters with their scales fit in far less
        raise InvalidInput("loras", f"{len(text)} bytes; at most 4096 (\"name:scale,name\")")
    try:
        text = text.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("loras", "is not UTF-8 text (expected \"name:scale,name\")") from None
    if text.strip() and not served:
        raise InvalidInput("loras", "not served by this repository: it was built without a LoRA library; rebuild "
                                    "with `flux2-klein build --runtime torch --lora-library DIR`")
    try:
        return parse_choice(text, served)
    except ValueError as e:
        raise InvalidInput("loras", str(e)) from None


def parse_references(value: np.ndarray | None) -> list[np.ndarray]:
    return _parse_references(value)[0]


def _parse_references(value: np.ndarray | None, limit: int = MAX_REFERENCES
                      ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """The preprocessed references and each one's (width, height) as sent."""
    if value is None:
        return [], []
    _check("reference_images", value, "BYTES", lambda shape: len(shape) == 1)
    if len(value) > limit:
        why = "" if limit == MAX_REFERENCES else f" with init_image, which takes the {MAX_REFERENCES}th condition"
        raise InvalidInput("reference_images", f"at most {limit}{why}, got {len(value)}")
    decoded = [_decode_reference(_as_bytes(f"reference_images[{i}]", item), i) for i, item in enumerate(value)]
    return [array for array, _ in decoded], [size for _, size in decoded]


# ----------------------------------------------------------------------------------------- references


def _open_image(data: bytes, name: str):
    from PIL import Image

    undecodable = InvalidInput(name, "not a decodable PNG, JPEG or WebP image")
    too_large = f"too large to decode; at most {MAX_DECODE_PIXELS} pixels (e.g. 8192x8192)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=REFERENCE_FORMATS)
    except Image.DecompressionBombError:
        raise InvalidInput(name, too_large) from None
    except Exception:  # UnidentifiedImageError (another format or none), OSError, SyntaxError, ...
        raise undecodable from None
    width, height = image.size
    if width * height > MAX_DECODE_PIXELS:
        raise InvalidInput(name, f"{width}x{height} is {too_large}")
    try:
        image.load()  # decode now: a truncated or corrupt file fails here, not later
    except Exception:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise undecodable from None
    return image


def _check_limits(image, name: str) -> None:
    """Flux2ImageProcessor.check_image_input's limits (the smallest side, the aspect ratio)."""
    width, height = image.size
    if width < REFERENCE_MIN_SIDE or height < REFERENCE_MIN_SIDE:
        raise InvalidInput(
            name, f"{width}x{height} is too small; both sides must be at least {REFERENCE_MIN_SIDE} pixels"
        )
    if max(width / height, height / width) > REFERENCE_MAX_ASPECT:
        raise InvalidInput(
            name,
            f"{width}x{height} has aspect ratio {max(width / height, height / width):.1f}:1; "
            f"at most {REFERENCE_MAX_ASPECT}:1 is allowed",
        )


def _open_single(value: np.ndarray, name: str, limits: bool = True):
    """A BYTES [1] input holding one encoded image, decoded (PIL), with the references' limits."""
    item = _check(name, value, "BYTES", lambda shape: tuple(shape) == (1,))[0]
    data = _as_bytes(name, item)
    if not data:
        raise InvalidInput(name, "empty; expected an encoded PNG, JPEG or WebP image")
    image = _open_image(data, name)
    if limits:
        _check_limits(image, name)
    return image


def prepare_image(picture, mask, size: tuple[int, int], padding_mask_crop: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray | None, tuple | None]:
    """The inpaint pipeline's `image` and `mask_image` at `size` (width, height), one of the 17 sizes:
    uint8 [H, W, 3] and float32 [H, W] of 0/1 (None without a mask), and with `padding_mask_crop` the
    (box, overlay) the paste after decoding needs (mask_crop.py), else None.

    Both are first resized to `size` unless they have it (Lanczos, in their decoded mode). From there it is
    the pipeline's step 2 for an image that needs no shrinking: `image_processor.preprocess(resize_mode=
    "default")` resizes to the same size (nothing) and converts to RGB; `mask_processor.preprocess` converts
    to grayscale, scales to 0..1 in float32 and binarizes (< 0.5 -> 0, >= 0.5 -> 1), diffusers v0.42.1
    image_processor.py `VaeImageProcessor.preprocess` / `binarize`. With a crop both are first cut to the
    box and scaled into the size with `resize_mode="fill"`."""
    from PIL import Image

    from . import mask_crop

    if picture.size != size:
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    if mask is None:
        return np.ascontiguousarray(np.asarray(picture.convert("RGB"), dtype=np.uint8)), None, None
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    crop = None
    cut_picture, cut_mask = picture, mask
    if padding_mask_crop is not None:
        box = mask_crop.crop_region(mask, *size, padding_mask_crop)
        if box is None:
            raise InvalidInput("padding_mask_crop", "the mask is black everywhere (it repaints nothing), so there "
                                                    "is no box to cut around it")
        cut_picture = mask_crop.fill_resize(picture.crop(box), *size)
        cut_mask = mask_crop.fill_resize(mask.crop(box), *size)
        crop = (box, mask_crop.overlay(picture, mask))
    image = np.ascontiguousarray(np.asarray(cut_picture.convert("RGB"), dtype=np.uint8))
    gray = np.asarray(cut_mask.convert("L")).astype(np.float32) / np.float32(255.0)
    return image, np.where(gray >= 0.5, np.float32(1), np.float32(0)).astype(np.float32), crop


def decode_reference(data: bytes, index: int) -> np.ndarray:
    """Decode one reference image file and preprocess it as `Flux2KleinPipeline.__call__` does:
    check_image_input's limits, Lanczos resize to 1024*1024 area when larger, sides floored to multiples
    of 16 by a centre crop, RGB conversion. Returns uint8 [H, W, 3]."""
    return _decode_reference(data, index)[0]


def _decode_reference(data: bytes, index: int) -> tuple[np.ndarray, tuple[int, int]]:
    """decode_reference's array, and the file's own (width, height)."""
    from PIL import Image

    name = f"reference_images[{index}]"
    if data is None or len(data) == 0:
        raise InvalidInput(name, "empty; expected an encoded PNG, JPEG or WebP image")
    image = _open_image(bytes(data), name)

    width, height = original = image.size
    _check_limits(image, name)

    # Flux2ImageProcessor._resize_to_target_area, in the decoded mode (Pillow resizes P and 1 images
    # nearest-neighbour whatever is asked, and LA/RGBA with premultiplied alpha).
    if width * height > REFERENCE_MAX_AREA:
        scale = math.sqrt(REFERENCE_MAX_AREA / (width * height))
        image = image.resize((int(width * scale), int(height * scale)), Image.Resampling.LANCZOS)
        width, height = image.size

    # Floor to multiples of 16, then VaeImageProcessor.preprocess(resize_mode="crop"), which in
    # Flux2ImageProcessor is a pure centre crop, followed by convert("RGB").
    multiple = PIXELS_PER_TOKEN_SIDE
    crop_w, crop_h = (width // multiple) * multiple, (height // multiple) * multiple
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array), original


# ------------------------------------------------------------------------------------------ tokenizer


class PromptTokenizer:
    """The checkpoint's tokenizer, applied as `Flux2KleinPipeline._get_qwen3_prompt_embeds` applies it:
    the chat template with one user message, a generation prompt and enable_thinking=False, padded and
    truncated to 512 tokens."""

    def __init__(self, path: str | Path, max_length: int = TEXT_TOKENS):
        from transformers import AutoTokenizer

        path = Path(path)
        if (path / "tokenizer").is_dir():  # a checkpoint root
            path = path / "tokenizer"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_length = max_length

    def template(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )

    def encode(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both int64 [1, 512]."""
        inputs = self.tokenizer(
            self.template(prompt),
            return_tensors="np",
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
        )
        input_ids = np.asarray(inputs["input_ids"], dtype=np.int64).reshape(1, self.max_length)
        attention_mask = np.asarray(inputs["attention_mask"], dtype=np.int64).reshape(1, self.max_length)
        return input_ids, attention_mask

    def encode_request(self, prompt: str, guided: bool) -> tuple[np.ndarray, np.ndarray]:
        """The text encoder's inputs for one request: [1, 512], or with classifier-free guidance [2, 512]
        (row 0 the prompt, row 1 the empty negative prompt, so one text-encoder call serves both)."""
        ids, mask = self.encode(prompt)
        if not guided:
            return ids, mask
        if not hasattr(self, "_negative"):
            self._negative = self.encode("")  # always "" for klein: tokenized once
        return np.concatenate([ids, self._negative[0]]), np.concatenate([mask, self._negative[1]])
