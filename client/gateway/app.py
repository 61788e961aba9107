"""The gateway's application: what one running gateway holds (`Gateway`) and its assembly (`create_app`):
the error handlers, each API's router, and the guard around them. Each API's models, service and routes
are in its own files (nim_*, openai_*), as vLLM's entrypoints/openai keeps protocol, serving and router."""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flux2_klein.sizes import MAX_REFERENCES

from .docs import add_docs_route
from .guard import LimitsMiddleware
from .metrics import Metrics
from .nim_router import nim_router
from .nim_serving import NimServing
from .openai_router import OpenAIErrors, openai_router
from .openai_serving import OpenAIServingImages
from .ops_router import ops_router
from .protocol import ApiError, error_response, validation_detail
from .serving import ImageService
from .settings import GatewaySettings

log = logging.getLogger("flux2_klein.gateway")


class Gateway:
    """What one running gateway holds: its settings, metrics, Triton service, and who may call how often
    (named keys and the rate limiter: a bad key file fails here, before the gateway listens)."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.metrics = Metrics(settings.max_concurrency)
        self.service = ImageService(settings, self.metrics)
        self.keys = settings.key_store()  # named keys, or None (then settings.api_key alone, if set)
        if settings.rate_per_minute:
            from .access import RateLimiter

            self.rate = RateLimiter(settings.rate_per_minute)
        else:
            self.rate = None


def create_app(settings: GatewaySettings) -> FastAPI:
    """The FastAPI application of one gateway (its Triton connection opens with the app's lifespan)."""
    gateway = Gateway(settings)
    service = gateway.service

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.open()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        title="FLUX.2 [klein] gateway",
        description=f"NVIDIA NIM's and OpenAI's image APIs for the Triton model {settings.model}: text-to-image "
                    f"and editing with up to {MAX_REFERENCES} reference images, with LoRAs of the server's library per "
                    "request where it serves one (GET /v1/loras).",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # add_docs_route serves it, with Swagger UI's files from a package
        redoc_url=None,
    )
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, validation_detail(list(exc.errors()), []))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        request_id = request.scope.get("state", {}).get("request_id", "?")
        log.error("request %s: unhandled %s", request_id, type(exc).__name__, exc_info=exc)
        return error_response(500, f"internal error in the gateway (request {request_id}); its log has the details")

    app.include_router(nim_router(NimServing(service)))
    app.include_router(ops_router(service))
    app.include_router(openai_router(OpenAIServingImages(service)))
    add_docs_route(app)
    app.add_middleware(LimitsMiddleware, gateway=gateway)
    app.add_middleware(OpenAIErrors)  # outermost, so that the guard's answers on /v1/images/* are shaped too
    return app
