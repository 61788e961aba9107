"""The route of NIM's API: POST /v1/infer."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .access import UNKNOWN
from .nim_protocol import ERRORS, InferRequest, InferResponse
from .nim_serving import NimServing
from .protocol import body_schema
from .responses import ImagesResponse


def nim_router(serving: NimServing) -> APIRouter:
    router = APIRouter()
    request_schema = body_schema(InferRequest)

    @router.post(
        "/v1/infer", response_model=InferResponse, responses=ERRORS,
        summary="Generate or edit images (NVIDIA NIM's API)",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}}},
    )
    async def infer(request: Request):
        # The body is parsed by the service, not by FastAPI, so that any Content-Type is read as JSON and every
        # message names its field in this API's terms.
        state = request.scope["state"]
        answer = await serving.infer(await request.body(), state["request_id"], state.get("caller", UNKNOWN))
        return ImagesResponse(answer)

    return router
