"""The routes about the gateway itself, the same for every API: health (live, ready), the served model, and
the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

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

    @router.get("/v1/models", summary="The model this gateway serves")
    async def models():
        return {"object": "list", "data": [{
            "id": settings.model, "object": "model", "created": service.created, "owned_by": "black-forest-labs",
            "root": settings.model, "parent": None,
        }]}

    @router.get("/v1/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    return router
