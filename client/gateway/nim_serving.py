"""NIM's /v1/infer without HTTP: a request body in, NIM's answer out (`{"artifacts": [...]}`, each image
as a `Base64` that responses.ImagesResponse writes), or an `ApiError`."""

from __future__ import annotations

from .access import UNKNOWN, Caller
from .nim_protocol import parse_body
from .responses import Base64
from .serving import ImageService


class NimServing:
    def __init__(self, service: ImageService):
        self.service = service

    async def infer(self, raw: bytes, request_id: str, caller: Caller = UNKNOWN) -> dict:
        body = parse_body(raw)
        images = await self.service.generate(body.generation(), request_id, caller)
        return {"artifacts": [
            {"base64": Base64(image.data), "finishReason": image.finish_reason, "seed": image.seed}
            for image in images]}
