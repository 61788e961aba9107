"""NVIDIA NIM's image API, POST /v1/infer (docs/CONTRACT.md section 4): the strict request model, its base64
images, the answer's model, and the error statuses the OpenAPI description lists."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flux2_klein import contract as api
from flux2_klein.request import MAX_PROMPT_CHARS
from flux2_klein.sizes import DEFAULT_SIZE, MAX_REFERENCES, size_names

from .protocol import (
    INT64_MAX, LORAS_DESCRIPTION, MAX_SAMPLES, ApiError, ErrorBody, Generation, Loras, check_loras, check_prompt,
    check_seeds, parse_json_object, random_seed, validation_detail,
)

# NIM's `mode`: klein has one variant, "base"; "inpaint" is this gateway's extension (image[0] is the picture
# to change, `mask_image` and `strength` go with it; the Triton model's init_image / mask_image / strength).
NIM_MODES = ("base", "inpaint")


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
    padding_mask_crop: int | None = Field(None, ge=0,
                                          description="mode 'inpaint' with mask_image: inpaint only the box around "
                                                      "the mask grown by this many pixels, pasted back (served "
                                                      "by repositories built with --padding-mask-crop)")
    loras: Loras | None = Field(
        None, description=LORAS_DESCRIPTION + " (served by repositories built with --lora-library)",
        examples=["style:0.8,detail"])
    samples: int = Field(1, ge=1, le=MAX_SAMPLES,
                         description=f"images per request, 1..{MAX_SAMPLES}: image i uses seed + i and equals the "
                                     "request of one image with that seed")
    disable_safety_checker: bool = Field(False, description="NIM's flag: skip the content safety check where "
                                                            "the gateway's guardrail allows it")

    def generation(self) -> Generation:
        check_seeds(self.seed, self.samples, "samples")
        loras = check_loras(self.loras)
        images = [decode_image(text, i) for i, text in enumerate(self.image or [])]
        picture = mask = None
        if self.mode == "inpaint":
            if not images:
                raise ApiError(422, "image: mode 'inpaint' needs the picture to change as image[0]")
            picture, images = images[0], images[1:]
            if self.mask_image is not None:
                mask = decode_image(self.mask_image, 0, field="mask_image")
        else:
            for name in ("mask_image", "strength", "padding_mask_crop"):
                if getattr(self, name) is not None:
                    raise ApiError(422, f"{name}: only with mode 'inpaint' (image[0] is then the picture to change)")
        return Generation(
            prompt=self.prompt, seed=self.seed or random_seed(), samples=self.samples, width=self.width,
            height=self.height, steps=self.steps, guidance=self.cfg_scale, references=images,
            output_format=self.output_format, disable_safety_checker=self.disable_safety_checker,
            image=picture, mask=mask, strength=self.strength, padding_mask_crop=self.padding_mask_crop,
            loras=loras,
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


class Artifact(BaseModel):
    base64: str
    finishReason: Literal["SUCCESS", "CONTENT_FILTERED", "ERROR"]
    seed: int


class InferResponse(BaseModel):
    artifacts: list[Artifact]


# The answers other than 200, for the OpenAPI description.
ERRORS = {status: {"model": ErrorBody, "description": what} for status, what in {
    400: "the body is empty or not JSON", 401: "missing or wrong API key", 413: "the body is too large",
    422: "a field is missing, of the wrong type, unknown or not allowed; the message names it",
    429: "too many requests in flight (Retry-After)", 500: "the gateway failed",
    502: "Triton failed the request", 503: "Triton or the model is not ready (Retry-After)",
    504: "no image within the gateway's timeout"}.items()}


def parse_body(raw: bytes) -> InferRequest:
    """The body of /v1/infer as a validated InferRequest, or ApiError 400 (not JSON) / 422 (not valid)."""
    data = parse_json_object(raw)
    try:
        request = InferRequest.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, validation_detail(e.errors(include_url=False), list(InferRequest.model_fields))) from None
    check_prompt(request.prompt)
    return request


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
