"""OpenAI's Images API (docs/CONTRACT.md section 4): the fields of `POST /v1/images/generations` (JSON) and
`POST /v1/images/edits` (multipart), and OpenAI's error shape, so that the official `openai` clients work
given only a base URL and a key.

What OpenAI documents and klein cannot do is refused by name (response_format "url", transparent
backgrounds, sizes other than the 17); what only tunes OpenAI's own models (quality, style, moderation,
user) is accepted and has no effect. An edit with a `mask` is inpainting: the first image is the picture to
change (the Triton model's init_image), the others references, and the mask's fully transparent pixels
(OpenAI's convention) become the white, repainted part of the model's mask_image. `seed`, `steps`,
`cfg_scale`, `strength`, `disable_safety_checker` and `loras` are this gateway's extensions (pass them with the
client's `extra_body`). `model` is the served model's name (or absent), or the name of one LoRA of the
server's library, which then applies at scale 1 before any the `loras` field names (GET /v1/models lists both,
as vLLM lists its LoRA adapters); any other name is refused by name."""

from __future__ import annotations

import io
import re
from typing import Literal

import numpy as np

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flux2_klein import contract as api
from flux2_klein.lora_library import RESERVED
from flux2_klein.sizes import MAX_REFERENCES, SIZES, parse_size, size_names

from .protocol import (
    INT64_MAX, LORAS_DESCRIPTION, MAX_SAMPLES, ApiError, Generation, Loras, body_schema, check_loras, check_prompt,
    check_seeds, random_seed, validation_detail,
)

IMAGES_PREFIX = "/v1/images/"
MAX_FORM_FILES = 16  # more than MAX_REFERENCES, so that a fifth image is refused by name, not by the parser
CONTENT_POLICY = "content filtered: the request or its image was refused by the content policy"
# OpenAI's error `type` for each status it can answer with.
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error"}
_FIELD = re.compile(r"([a-z_]+(?:/[a-z_]+)?)(?:\[\d+\])?:")  # the field a message starts with


class ImagesRequest(BaseModel):
    """The fields of both endpoints (an edit's images come as files beside them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="the text prompt (UTF-8; may be empty)")
    model: str | None = Field(None, description="the served model (absent: the same), or one LoRA of its library "
                                                "at scale 1: a name GET /v1/models lists")
    n: int | None = Field(1, ge=1, le=MAX_SAMPLES, description=f"images, 1..{MAX_SAMPLES}: image i uses seed + i")
    size: str | None = Field("auto", description=f"WIDTHxHEIGHT, one of {size_names()}; or auto: 1024x1024, or "
                                                  "for an edit the size nearest the first image's aspect ratio")
    response_format: Literal["b64_json"] | None = Field(
        "b64_json", description="b64_json only: this gateway keeps no files to link to")
    output_format: Literal["png", "jpeg", "webp"] | None = Field("png", description="encoding of the images")
    output_compression: int | None = Field(None, ge=0, le=100, description="JPEG/WebP quality, 0..100 (default 95)")
    background: Literal["auto", "opaque"] | None = Field(None, description="images are opaque RGB")
    quality: str | None = Field(None, description="accepted for OpenAI compatibility; no effect")
    style: str | None = Field(None, description="accepted for OpenAI compatibility; no effect")
    moderation: str | None = Field(None, description="accepted for OpenAI compatibility; no effect")
    input_fidelity: str | None = Field(None, description="accepted for OpenAI compatibility; no effect")
    user: str | None = Field(None, description="accepted for OpenAI compatibility; no effect")
    stream: Literal[False] | None = Field(None, description="not supported: images come whole")
    # Extensions.
    seed: int | None = Field(None, ge=0, le=INT64_MAX, description="noise seed, >= 0 (absent: random); returned "
                                                                   "with each image")
    steps: int | None = Field(None, ge=api.MIN_STEPS, le=api.MAX_STEPS, description="denoising steps")
    cfg_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="guidance scale (base checkpoints)")
    disable_safety_checker: bool = Field(False, description="as NIM's flag of that name")
    strength: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                   description=f"an edit with a mask: how much to change, 0..1 (default "
                                               f"{api.DEFAULT_STRENGTH})")
    loras: Loras | None = Field(
        None, description=LORAS_DESCRIPTION + "; after the LoRA `model` names, if it names one (an edit's form "
                          "field: the \"name:scale,name\" form)", examples=["style:0.8,detail"])

    @field_validator("output_format", mode="before")
    @classmethod
    def _format_alias(cls, value):
        return "jpeg" if isinstance(value, str) and value.strip().lower() == "jpg" else value

    def generation(self, references: list[bytes], mask: bytes | None = None) -> Generation:
        width = height = None
        if self.size not in (None, "auto"):
            try:
                width, height = parse_size(self.size)
            except ValueError:
                raise ApiError(422, f"size: {self.size!r} is not WIDTHxHEIGHT; allowed: auto, {size_names()}") from None
            if (width, height) not in SIZES:
                raise ApiError(422, f"size: {self.size} is not supported; allowed: auto, {size_names()}")
        n = self.n or 1
        check_prompt(self.prompt)
        check_seeds(self.seed, n, "n")
        image = None
        if mask is not None:  # inpainting: the first image is the picture, the mask in the model's convention
            image, references = references[0], references[1:]
            mask = openai_mask(mask, image)
        elif self.strength is not None:
            raise ApiError(422, "strength: only for an edit with a mask")
        loras = check_loras(self.loras)
        return Generation(
            prompt=self.prompt, seed=random_seed() if self.seed is None else self.seed, samples=n, width=width,
            height=height, steps=self.steps, guidance=self.cfg_scale, references=references,
            output_format=self.output_format or "png", output_quality=self.output_compression,
            disable_safety_checker=self.disable_safety_checker, image=image, mask=mask, strength=self.strength,
            loras=loras,
        )


def names_base_model(model: str | None, served: str) -> bool:
    """Whether OpenAI's `model` means the served model itself: absent, its name, or flux2_klein / flux2-klein."""
    return model is None or model == served or model.lower() in RESERVED


def unknown_model(model: str, served: str, lora_names: tuple[str, ...]) -> ApiError:
    """OpenAI's answer to a model it does not have (400, param `model`), listing what is served."""
    return ApiError(422, f"model: {model!r} is not served here; served: {', '.join((served, *lora_names))}")


def openai_mask(data: bytes, image: bytes) -> bytes:
    """OpenAI's mask (a PNG whose fully transparent pixels, alpha 0, mark where to edit; the first image's
    size) -> the Triton model's mask_image: a grayscale PNG, white (255) where alpha is 0, black elsewhere."""
    from PIL import Image, UnidentifiedImageError

    try:
        mask = Image.open(io.BytesIO(data), formats=("PNG",))
        mask.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ApiError(422, "mask: not a decodable PNG (OpenAI's mask: transparent pixels mark where to edit)") from None
    try:
        size = Image.open(io.BytesIO(image)).size  # the header only; Triton decodes the image itself
    except Exception:  # noqa: BLE001 - Triton names an undecodable image
        size = None
    if size is not None and mask.size != size:
        raise ApiError(422, f"mask: {mask.width}x{mask.height} is not the first image's size {size[0]}x{size[1]}")
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise ApiError(422, f"mask: a {mask.mode} PNG without alpha; OpenAI's mask marks where to edit with fully "
                            "transparent pixels")
    alpha = np.asarray(mask.convert("RGBA"))[..., 3]
    out = io.BytesIO()
    Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def validated(data: dict, strict: bool) -> ImagesRequest:
    """The fields as an ImagesRequest, or ApiError 422 naming the field. Form values are text: `strict=False`
    reads "2" as an integer and "true" as a boolean there (the JSON endpoint stays strict)."""
    try:
        return ImagesRequest.model_validate(data, strict=strict)
    except ValidationError as e:
        raise ApiError(422, validation_detail(e.errors(include_url=False), list(ImagesRequest.model_fields))) from None


def request_schemas() -> tuple[dict, dict]:
    """The OpenAPI schemas of the generations body (JSON) and of the edits form (the fields and the files)."""
    schema = body_schema(ImagesRequest)
    edit_schema = {**schema, "required": ["prompt", "image"], "properties": {**schema["properties"], "image": {
        "type": "array", "items": {"type": "string", "format": "binary"}, "maxItems": MAX_REFERENCES,
        "description": f"1..{MAX_REFERENCES} reference images (PNG, JPEG, WebP); also accepted as image[]"}}}
    return schema, edit_schema


# The 200 answer, for the OpenAPI description.
ANSWER = {"200": {"description": "the images", "content": {"application/json": {"schema": {
    "type": "object", "properties": {"created": {"type": "integer"}, "data": {"type": "array"}}}}}}}


def openai_error(status: int, detail: str) -> tuple[int, dict]:
    """A {"detail"} answer -> OpenAI's status and body. OpenAI answers a bad request 400, where NIM's 422."""
    status = 400 if status == 422 else status
    named = _FIELD.match(detail) if status == 400 else None
    param = None if named is None else {"width/height": "size", "mask_image": "mask"}.get(named.group(1),
                                                                                          named.group(1))
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = "invalid_api_key" if status == 401 else "content_policy_violation" if detail == CONTENT_POLICY else None
    return status, {"error": {"message": detail, "type": kind, "param": param, "code": code}}
