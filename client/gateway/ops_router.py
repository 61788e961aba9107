"""The routes about the gateway itself, the same for every API: health (live, ready), the served model and its
LoRAs, and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from flux2_klein.lora_library import MAX_PER_REQUEST, MAX_SCALE

from .protocol import ErrorBody, error_response
from .serving import ImageService


def ops_router(service: ImageService) -> APIRouter:
    router = APIRouter()
    settings = service.settings

    @router.get("/v1/health/live", summary="Whether the gateway's process is up")
    async def live():
        return {"status": "live"}

    @router.get("/v1/health/ready", summary="Whether Triton and the model are ready",
                responses={503: {"model": ErrorBody, "description": "not ready"}})
    async def ready():
        ok, message = await service.readiness()
        if ok:
            return {"status": "ready", "detail": message}
        return error_response(503, message, {"Retry-After": str(settings.retry_after_s)})

    unavailable = {503: {"model": ErrorBody, "description": "Triton can't be asked for the LoRA names (Retry-After)"}}

    @router.get("/v1/models", summary="The model this gateway serves, and one entry per LoRA of its library",
                responses=unavailable)
    async def models():
        # As vLLM lists LoRA adapters: each is a model of its own (OpenAI's `model` field may name it), whose
        # parent is the base model.
        base = {"id": settings.model, "object": "model", "created": service.created,
                "owned_by": "black-forest-labs", "root": settings.model, "parent": None}
        loras = [{"id": name, "object": "model", "created": service.created, "owned_by": "lora-library",
                  "root": name, "parent": settings.model} for name in await service.lora_names()]
        return {"object": "list", "data": [base, *loras]}

    @router.get("/v1/loras", summary="The LoRAs a request may name (`loras`; OpenAI's `model`)",
                responses=unavailable)
    async def loras():
        return {"object": "list", "max_per_request": MAX_PER_REQUEST, "data": [
            {"name": name, "object": "lora", "parent": settings.model, "default_scale": 1.0,
             "scale_range": [-MAX_SCALE, MAX_SCALE]} for name in await service.lora_names()]}

    @router.get("/v1/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return router
