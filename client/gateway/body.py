"""The body of POST /v1/infer (NVIDIA NIM's request, docs/CONTRACT.md section 4): the strict request model,
JSON parsing with messages that name the field, base64 images, and the answer's image encoding."""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.responses import Response

from flux2_klein import contract as api
from flux2_klein.request import MAX_PROMPT_CHARS
from flux2_klein.sizes import DEFAULT_SIZE, MAX_REFERENCES, SIZES, size_names

from .. import codecs

RANDOM_SEED_BOUND = 2**32  # random seeds are 1..2**32-1, as NIM's image APIs use (never 0: NIM's "random")
INT64_MAX = 2**63 - 1
MAX_SAMPLES = 4  # images per request (NIM `samples`, OpenAI `n`); image i uses seed + i
OUTPUT_FORMATS = {"png": ".png", "jpeg": ".jpeg", "webp": ".webp"}
# NIM's `mode`: klein has one variant, "base"; "inpaint" is this gateway's extension (image[0] is the picture
# to change, `mask_image` and `strength` go with it; the Triton model's init_image / mask_image / strength).
NIM_MODES = ("base", "inpaint")


def random_seed() -> int:
    return 1 + secrets.randbelow(RANDOM_SEED_BOUND - 1)


@dataclass
class Generation:
    """What one API request asks of Triton, whichever API it came in: `samples` images of one prompt and
    size, image i with seed `seed + i`. None leaves an input to the model's default (for width and height
    with references: the size nearest the first reference's aspect ratio)."""

    prompt: str
    seed: int
    samples: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    references: list[bytes] = field(default_factory=list)
    output_format: str = "png"
    output_quality: int | None = None  # JPEG/WebP quality; None: the client's documented default
    # NIM's flag, carried for the guardrail (which decides what it may switch off); the gateway itself has no
    # safety checker to disable.
    disable_safety_checker: bool = False
    # Inpainting / image-to-image: the picture to change (Triton's init_image), its mask (white repaints,
    # the picture's size; None: all repainted) and strength (None: the model's default).
    image: bytes | None = None
    mask: bytes | None = None
    strength: float | None = None

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.samples)]


class InferRequest(BaseModel):
    """The body of POST /v1/infer: NIM's fields with NIM's meaning, plus `output_format`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS,
                        description=f"the text prompt (UTF-8; may be empty; at most {MAX_PROMPT_CHARS} characters)")
    mode: Literal[NIM_MODES] = Field("base", description="NIM's model variant, 'base'; or this gateway's "
                                     "'inpaint': image[0] is the picture to change (the rest references), with "
                                     "mask_image and strength")
    width: int | None = Field(None, description=f"output width; with height one of: {size_names()}",
                              examples=[1024])
    height: int | None = Field(None, description=f"output height (default {DEFAULT_SIZE[1]})", examples=[1024])
    seed: int | None = Field(0, ge=0, le=INT64_MAX,
                             description="noise seed, >= 0; 0 (the default) or null: a random one. Each artifact "
                                         "returns the seed it used")
    steps: int | None = Field(None, ge=api.MIN_STEPS, le=api.MAX_STEPS,
                              description=f"denoising steps (default: {api.DEFAULT_STEPS_DISTILLED} distilled, "
                                          f"{api.DEFAULT_STEPS_BASE} base)")
    cfg_scale: float | None = Field(None, ge=0, allow_inf_nan=False,
                                    description=f"guidance scale (default: {api.DEFAULT_GUIDANCE_DISTILLED}, ignored, "
                                                f"distilled; {api.DEFAULT_GUIDANCE_BASE} base)")
    image: list[str] | None = Field(
        None, max_length=MAX_REFERENCES,
        description=f"up to {MAX_REFERENCES} reference images for editing: PNG, JPEG or WebP files as base64 "
                    "or data URLs (data:image/png;base64,...); a single string counts as a list of one",
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="encoding of the answered image: png (lossless, default), jpeg or webp")
    mask_image: str | None = Field(None, description="mode 'inpaint': the mask, base64 or a data URL, image[0]'s "
                                                     "size: white repaints, black keeps (absent: image-to-image)")
    strength: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                   description=f"mode 'inpaint': how much of image[0] to change, 0..1 (default "
                                               f"{api.DEFAULT_STRENGTH}); too small for any step is refused")
    samples: int = Field(1, ge=1, le=MAX_SAMPLES,
                         description=f"images per request, 1..{MAX_SAMPLES}: image i uses seed + i and equals the "
                                     "request of one image with that seed")
    disable_safety_checker: bool = Field(False, description="NIM's flag: skip the content safety check where "
                                                            "the gateway's guardrail allows it")

    def generation(self) -> Generation:
        check_seeds(self.seed, self.samples, "samples")
        images = [decode_image(text, i) for i, text in enumerate(self.image or [])]
        picture = mask = None
        if self.mode == "inpaint":
            if not images:
                raise ApiError(422, "image: mode 'inpaint' needs the picture to change as image[0]")
            picture, images = images[0], images[1:]
            if self.mask_image is not None:
                mask = decode_image(self.mask_image, 0, field="mask_image")
        else:
            for name in ("mask_image", "strength"):
                if getattr(self, name) is not None:
                    raise ApiError(422, f"{name}: only with mode 'inpaint' (image[0] is then the picture to change)")
        return Generation(
            prompt=self.prompt, seed=self.seed or random_seed(), samples=self.samples, width=self.width,
            height=self.height, steps=self.steps, guidance=self.cfg_scale, references=images,
            output_format=self.output_format, disable_safety_checker=self.disable_safety_checker,
            image=picture, mask=mask, strength=self.strength,
        )

    @field_validator("image", mode="before")
    @classmethod
    def _one_image(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("output_format", mode="before")
    @classmethod
    def _format_alias(cls, value):
        if isinstance(value, str):
            value = value.strip().lower()
            return "jpeg" if value == "jpg" else value
        return value


class ApiError(Exception):
    """An answer other than 200, raised anywhere while serving a request."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def _describe_input(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    # A lone surrogate can't be sent back as UTF-8: show it escaped.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 60 else text[:57] + "..."


def _field_name(loc) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("list[str]", "str"):  # a union member's tag, not a field
            continue
        else:
            name += ("." if name else "") + str(part)
    return name or "body"


def validation_detail(errors: list[dict], allowed: list[str]) -> str:
    """pydantic's errors as one message, each part naming its field: 'width: Input should be ... got "big"'."""
    parts = []
    for err in errors:
        field = _field_name(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"{field}: unknown field; allowed fields: {', '.join(allowed)}")
        elif kind == "missing":
            parts.append(f"{field}: required")
        elif kind == "string_unicode":
            parts.append(f"{field}: not valid Unicode text (a lone surrogate)")
        elif kind == "too_long" and "max_length" in err.get("ctx", {}):
            ctx = err["ctx"]
            things = "images" if field == "image" else "entries"
            parts.append(f"{field}: at most {ctx['max_length']} {things}, got {ctx.get('actual_length', 'more')}")
        else:
            message = err.get("msg", "invalid")
            if "input" in err:
                message += f"; got {_describe_input(err['input'])}"
            parts.append(f"{field}: {message}")
    return "; ".join(parts)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict:
    """A request body as a JSON object, or ApiError 400 (not JSON) / 422 (not an object)."""
    if not raw.strip():
        raise ApiError(400, 'request body is empty; expected a JSON object such as {"prompt": "a red fox"}')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 text (invalid byte at offset {e.start}); send JSON") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # NaN, Infinity
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:  # arrays or objects nested thousands deep: a client's doing, not ours
        raise ApiError(400, "request body nests JSON arrays or objects too deeply") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise ApiError(422, f'request body must be a JSON object such as {{"prompt": "a red fox"}}; got {kind}')
    return data


def parse_body(raw: bytes) -> InferRequest:
    """The body of /v1/infer as a validated InferRequest, or ApiError 400 (not JSON) / 422 (not valid)."""
    data = parse_json_object(raw)
    try:
        request = InferRequest.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, validation_detail(e.errors(include_url=False), list(InferRequest.model_fields))) from None
    check_prompt(request.prompt)
    return request


def check_prompt(prompt: str) -> None:
    if len(prompt) > MAX_PROMPT_CHARS:  # Triton's preprocess refuses it too; no need to send megabytes there
        raise ApiError(422, f"prompt: at most {MAX_PROMPT_CHARS} characters (only the first 512 tokens are used); "
                            f"got {len(prompt)}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(422, f"prompt: not valid Unicode text (a lone surrogate at character {e.start})") from None


_DATA_URL = re.compile(r"data:(?P<mime>[^,;]*)(?P<params>(?:;[^,;]*)*),(?P<data>.*)", re.DOTALL | re.IGNORECASE)
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=_-]*")


def decode_image(text: str, index: int, field: str | None = None) -> bytes:
    """One entry of "image" (or `field`): plain base64 (standard or URL-safe, padding optional, whitespace
    ignored) or a base64 data URL of an image type -> the file's bytes. Whether they are a decodable image is
    Triton's call."""
    field = field or f"image[{index}]"
    data = text.strip()
    if data[:5].lower() == "data:":
        m = _DATA_URL.fullmatch(data)
        if not m:
            raise ApiError(422, f"{field}: malformed data URL; expected data:image/png;base64,<base64>")
        mime = m.group("mime").strip().lower()
        if mime and not mime.startswith("image/"):
            raise ApiError(422, f"{field}: data URL of type {mime!r}; expected an image (image/png, image/jpeg, "
                                "image/webp)")
        if "base64" not in [p.strip().lower() for p in m.group("params").split(";")]:
            raise ApiError(422, f"{field}: only base64 data URLs are supported (data:image/png;base64,...)")
        data = m.group("data")
    data = re.sub(r"\s+", "", data)
    if not data:
        raise ApiError(422, f"{field}: empty; expected a PNG, JPEG or WebP file as base64 or a data URL")
    if not _BASE64_CHARS.fullmatch(data):
        bad = next(c for c in data if not _BASE64_CHARS.fullmatch(c))
        raise ApiError(422, f"{field}: not valid base64 (character {bad!r}); expected a PNG, JPEG or WebP file as "
                            "base64 or a data URL (data:image/png;base64,...)")
    data = data.rstrip("=").translate(str.maketrans("-_", "+/"))
    try:
        decoded = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, f"{field}: not valid base64 ({e})") from None
    if not decoded:
        raise ApiError(422, f"{field}: empty; expected a PNG, JPEG or WebP file")
    return decoded


def check_seeds(seed: int | None, count: int, count_field: str) -> None:
    if seed is not None and seed + count - 1 > INT64_MAX:
        raise ApiError(422, f"seed: with {count_field}={count}, at most {INT64_MAX - count + 1} (image i uses "
                            f"seed + i, an INT64)")


def check_size(width: int | None, height: int | None) -> None:
    if width is None and height is None:
        return
    pair = (DEFAULT_SIZE[0] if width is None else width, DEFAULT_SIZE[1] if height is None else height)
    if pair not in SIZES:
        raise ApiError(422, f"width/height: {pair[0]}x{pair[1]} (width x height) is not supported; allowed: "
                            f"{size_names()}")


# Triton's input names, as they start its INVALID_ARGUMENT messages, -> this API's field names.
_FIELD_NAMES = [
    (re.compile(r"\breference_images\b"), "image"),
    (re.compile(r"\binit_image\b"), "image[0]"),
    (re.compile(r"\bnum_inference_steps\b"), "steps"),
    (re.compile(r"\bguidance_scale\b"), "cfg_scale"),
    (re.compile(r"\bheight/width\b"), "width/height"),
]
# Where a message about one input starts: "height/width: ...", "reference_images[2]: ...", "seed: ...".
_FIELD_START = re.compile(r"\b(height/width|" + "|".join(map(re.escape, api.INPUT_NAMES)) + r")(?:\[\d+\])?:")


def api_message(triton_message: str) -> str:
    """A Triton INVALID_ARGUMENT message in this API's field names: 'reference_images[0]: ...' -> 'image[0]: ...'."""
    message = triton_message.strip()
    # The ensemble prefixes its step's message ("in ensemble 'flux2_klein', ..."): keep what names the field.
    m = _FIELD_START.search(message)
    if m:
        message = message[m.start():]
    for pattern, name in _FIELD_NAMES:
        message = pattern.sub(name, message)
    return message


def encode_image(array, fmt: str, quality: int | None = None) -> bytes:
    """PNG (lossless), or JPEG/WebP at `quality` (default: the client's, 95); PNG ignores quality. The encoders
    are the client's (client/codecs.py)."""
    return codecs.encode(array, fmt, quality)


async def encode_image_async(array, fmt: str, quality: int | None = None) -> bytes:
    """`encode_image` off the event loop, on the codecs' pool of one thread per core: the samples of a request
    encode side by side, and a burst of encodes cannot take the default executor's threads."""
    return await codecs.encode_async(array, fmt, quality)


class Base64:
    """A file to answer as a base64 JSON string, written by `images_json` straight into the body's bytes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def images_json(value) -> bytes:
    """`value` (dicts, lists, JSON scalars and Base64 files) as compact JSON bytes. Each image goes in as
    base64.b64encode's bytes, copied once, into the one join at the end: json.dumps would scan and copy each
    3-4 MB string of a 1 MP PNG again (Starlette's JSONResponse, ensure_ascii=False: about 35 ms per image on a
    small CPU, more than encoding it; this: the base64 itself, about 5 ms)."""
    parts: list[bytes] = []
    _json_parts(value, parts)
    return b"".join(parts)


def _json_parts(value, parts: list[bytes]) -> None:
    if isinstance(value, Base64):
        parts += (b'"', base64.b64encode(value.data), b'"')
    elif isinstance(value, dict):
        parts.append(b"{")
        for i, (k, v) in enumerate(value.items()):
            parts.append((b"," if i else b"") + json.dumps(str(k)).encode() + b":")
            _json_parts(v, parts)
        parts.append(b"}")
    elif isinstance(value, (list, tuple)):
        parts.append(b"[")
        for i, v in enumerate(value):
            if i:
                parts.append(b",")
            _json_parts(v, parts)
        parts.append(b"]")
    else:
        parts.append(json.dumps(value, allow_nan=False).encode())


class ImagesResponse(Response):
    """A 200 JSON answer with images (see images_json)."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return images_json(content)

