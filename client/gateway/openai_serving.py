"""OpenAI's Images API without HTTP: a generations body, or an edit's fields and files, in; OpenAI's answer
(`{"created", "data": [{"b64_json", ...}], ...}`) out, or an `ApiError` (which openai_router.OpenAIErrors
puts in OpenAI's shape)."""

from __future__ import annotations

import time

from flux2_klein.sizes import MAX_REFERENCES

from .access import UNKNOWN, Caller
from .openai_protocol import CONTENT_POLICY, ImagesRequest, names_base_model, unknown_model, validated
from .protocol import ApiError, Generation, check_loras, parse_json_object
from .responses import Base64
from .serving import Image, ImageService


class OpenAIServingImages:
    def __init__(self, service: ImageService):
        self.service = service

    async def generations(self, raw: bytes, request_id: str, caller: Caller = UNKNOWN) -> dict:
        body = validated(parse_json_object(raw), strict=True)
        generation = await self._with_model(body, body.generation([]))
        images = await self.service.generate(generation, request_id, caller)
        return _answer(_refuse_filtered(images), generation.output_format)

    async def edits(self, fields: dict[str, str], images: list[bytes], mask: bytes | None, request_id: str,
                    caller: Caller = UNKNOWN) -> dict:
        """An edit: the form's text fields, its image files in order, and its mask file (None: no mask)."""
        if not images:
            raise ApiError(422, "image: required; send 1 to 4 image files (PNG, JPEG or WebP)")
        if len(images) > MAX_REFERENCES:
            raise ApiError(422, f"image: at most {MAX_REFERENCES} images, got {len(images)}")
        for i, data in enumerate(images):
            if not data:
                raise ApiError(422, f"image[{i}]: empty; expected a PNG, JPEG or WebP file")
        body = validated(fields, strict=False)
        generation = await self._with_model(body, body.generation(images, mask))
        answer = await self.service.generate(generation, request_id, caller)
        return _answer(_refuse_filtered(answer), generation.output_format)

    async def _with_model(self, body: ImagesRequest, generation: Generation) -> Generation:
        """`generation` (every field checked) with the LoRA `model` names first in its set, when it names one;
        ApiError naming `model` when it names neither the served model nor a LoRA of its library."""
        served = self.service.settings.model
        if names_base_model(body.model, served):
            return generation
        names = await self.service.lora_names(wanted=body.model)
        if body.model not in names:
            raise unknown_model(body.model, served, names)
        generation.loras = check_loras(body.loras, first=(body.model,))
        return generation


def _answer(images: list[Image], output_format: str) -> dict:
    first = images[0]
    return {"created": int(time.time()), "data": [
        {"b64_json": Base64(image.data), "revised_prompt": None, "seed": image.seed}
        for image in images], "output_format": output_format, "size": f"{first.width}x{first.height}"}


def _refuse_filtered(images: list[Image]) -> list[Image]:
    """OpenAI answers a refused request with an error (code content_policy_violation), not an image."""
    if any(image.finish_reason == "CONTENT_FILTERED" for image in images):
        raise ApiError(400, CONTENT_POLICY)
    return images
