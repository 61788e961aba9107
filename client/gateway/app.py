"""The gateway's application: its connection to Triton (`Gateway`) and the routes (`create_app`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass

import numpy as np
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from flux2_klein.contract import OUTPUT
from flux2_klein.sizes import DEFAULT_SIZE, MAX_REFERENCES

from ..triton_client import INVALID_ARGUMENT, build_inputs, to_generation_error
from .body import (
    ApiError, Base64, Generation, ImagesResponse, InferRequest, api_message, check_size, encode_image_async,
    parse_body, validation_detail,
)
from .guard import LimitsMiddleware
from .metrics import Metrics
from .openai_api import OpenAIErrors, add_openai_routes
from .settings import ENV, GatewaySettings

log = logging.getLogger("flux2_klein.gateway")

READY_TIMEOUT_S = 3.0  # how long /v1/health/ready waits for Triton's answers


class Artifact(BaseModel):
    base64: str
    finishReason: Literal["SUCCESS", "CONTENT_FILTERED", "ERROR"]
    seed: int


class InferResponse(BaseModel):
    artifacts: list[Artifact]


@dataclass
class Image:
    """One generated image, encoded."""

    seed: int
    data: bytes
    width: int
    height: int
    finish_reason: str = "SUCCESS"


class ErrorBody(BaseModel):
    detail: str


# The answers other than 200, for the OpenAPI description.
ERRORS = {status: {"model": ErrorBody, "description": what} for status, what in {
    400: "the body is empty or not JSON", 401: "missing or wrong API key", 413: "the body is too large",
    422: "a field is missing, of the wrong type, unknown or not allowed; the message names it",
    429: "too many requests in flight (Retry-After)", 500: "the gateway failed",
    502: "Triton failed the request", 503: "Triton or the model is not ready (Retry-After)",
    504: "no image within the gateway's timeout"}.items()}


class Gateway:
    """What one running gateway holds: its settings, metrics, and its connection to Triton."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.metrics = Metrics(settings.max_concurrency)
        self.in_flight = 0
        self.client = None  # tritonclient.grpc.aio.InferenceServerClient, made inside the event loop
        self.created = int(time.time())
        self.keys = settings.key_store()  # named keys, or None (then settings.api_key alone, if set)
        if settings.rate_per_minute:
            from flux2_klein.guardrail.limits import RateLimiter

            self.rate = RateLimiter(settings.rate_per_minute)
        else:
            self.rate = None

    async def open(self) -> None:
        # Why tritonclient.grpc.aio rather than the synchronous Flux2KleinClient in a thread pool: an await
        # holds no thread, so the concurrency limit costs nothing per request; and a timeout cancels the
        # awaiting task, which cancels the gRPC call itself (Triton sees the cancellation), where a thread
        # blocked in a synchronous call could not be interrupted and would hold its worker past the 504.
        # From the synchronous client we reuse what is protocol-level: build_inputs (the InferInput objects
        # are the same class for both) and to_generation_error (the same exceptions).
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aioclient

        keepalive = grpcclient.KeepAliveOptions()
        channel_args = [
            ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            # gRPC's reconnect backoff grows to 120 s by default: a gateway started before Triton would then
            # stay "not ready" for up to two minutes after Triton is. Retry every second or two instead.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.client = aioclient.InferenceServerClient(self.settings.triton_url, channel_args=channel_args)

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
            self.client = None

    # -- /v1/health/ready ----------------------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, str]:
        from tritonclient.utils import InferenceServerException

        where = f"Triton at {self.settings.triton_url}"
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                if not await self.client.is_server_ready(client_timeout=READY_TIMEOUT_S):
                    return False, f"{where} is not ready"
                if not await self.client.is_model_ready(self.settings.model, client_timeout=READY_TIMEOUT_S):
                    return False, f"model {self.settings.model} is not ready in {where}"
        except TimeoutError:
            return False, f"{where} did not answer within {READY_TIMEOUT_S} s"
        except InferenceServerException as e:
            return False, to_generation_error(e, self.settings.triton_url, "grpc", READY_TIMEOUT_S).message
        return True, f"{where} and model {self.settings.model} are ready"

    # -- image generation, for every API ------------------------------------------------------------------------

    async def generate(self, gen: Generation, request_id: str, caller: str = "?") -> list[Image]:
        """`generate_images` with one audit line per request: who (the key's name or the address), a hash of
        the prompt (never the prompt), and what came of it."""
        import hashlib

        outcome = "error"
        try:
            images = await self.generate_images(gen, request_id)
            outcome = ",".join(sorted({image.finish_reason for image in images}))
            return images
        finally:
            if caller.startswith("key "):
                self.metrics.by_key.labels(caller[4:], outcome).inc()
            log.info("audit request=%s caller=%s prompt_sha256=%s samples=%d outcome=%s", request_id, caller,
                     hashlib.sha256(gen.prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16], gen.samples,
                     outcome)

    async def generate_images(self, gen: Generation, request_id: str) -> list[Image]:
        """A Generation -> its images, in seed order; ApiError for every failure.

        Several samples go to Triton as concurrent requests, one per seed, not one after another: the sampler is
        a dynamically batched model, so requests of one shape that arrive together share one denoising loop,
        and each image is exactly the single request with its seed."""
        from tritonclient.utils import InferenceServerException

        s = self.settings
        check_size(gen.width, gen.height)
        deadline = time.monotonic() + s.timeout_s
        timeout_detail = f"no image within {s.timeout_s:g} s (the gateway's --timeout / {ENV['timeout_s']})"
        try:
            async with asyncio.timeout(s.timeout_s):
                try:
                    async with asyncio.TaskGroup() as group:
                        tasks = [group.create_task(self._one(gen, seed, request_id, i, deadline))
                                 for i, seed in enumerate(gen.seeds)]
                except BaseExceptionGroup as failed:  # the first failure speaks for the request
                    raise failed.exceptions[0] from None
                return [task.result() for task in tasks]
        except TimeoutError:
            raise ApiError(504, timeout_detail) from None
        except InferenceServerException as e:
            error = to_generation_error(e, s.triton_url, "grpc", s.timeout_s)
            retry = {"Retry-After": str(s.retry_after_s)}
            if error.status == INVALID_ARGUMENT:
                raise ApiError(422, api_message(error.message)) from None
            if error.status == "DEADLINE_EXCEEDED":
                raise ApiError(504, timeout_detail) from None
            log.error("request %s: Triton %s: %s", request_id, error.status, error.message)
            if error.status in ("UNAVAILABLE", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED"):
                detail = (f"the inference server is unavailable ({error.status}; model {s.model} at "
                          f"{s.triton_url}); retry later")
                raise ApiError(503, detail, retry) from None
            raise ApiError(502, f"the inference server failed this request ({error.status}, request "
                                f"{request_id}); the gateway's log has its message") from None

    async def _one(self, gen: Generation, seed: int, request_id: str, index: int, deadline: float) -> Image:
        import tritonclient.grpc as grpcclient

        s = self.settings
        from tritonclient.utils import InferenceServerException

        from flux2_klein.guardrail.core import filtered_stage

        inputs = build_inputs(
            gen.prompt, width=gen.width, height=gen.height, seed=seed, steps=gen.steps, guidance=gen.guidance,
            references=gen.references, protocol="grpc",
            disable_safety_checker=True if gen.disable_safety_checker else None,
            image=gen.image, mask=gen.mask, strength=gen.strength,
        )
        triton_id = request_id if gen.samples == 1 else f"{request_id}.{index}"
        try:
            result = await self.client.infer(
                s.model, inputs, outputs=[grpcclient.InferRequestedOutput(OUTPUT.name)], request_id=triton_id,
                client_timeout=max(deadline - time.monotonic(), 0.001),
            )
        except InferenceServerException as e:
            stage = filtered_stage(e.message() or "")
            if stage is None:
                raise
            # NIM's answer to a refused request: the artifact says CONTENT_FILTERED, and its image is black
            # (nothing of what was asked or generated leaves); the guardrail's audit line has the details.
            log.info("request %s: content filtered (%s)", triton_id, stage)
            width, height = (gen.width or DEFAULT_SIZE[0], gen.height or DEFAULT_SIZE[1])
            black = np.zeros((height, width, 3), dtype=np.uint8)
            encoded = await encode_image_async(black, gen.output_format, gen.output_quality)
            return Image(seed=seed, data=encoded, width=width, height=height, finish_reason="CONTENT_FILTERED")
        image = result.as_numpy(OUTPUT.name)
        if image is None or image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 3:
            got = "nothing" if image is None else f"{image.dtype} {list(image.shape)}"
            log.error("request %s: %s answered %s for 'image'", triton_id, s.model, got)
            raise ApiError(502, f"the inference server answered an unusable image (request {request_id})")
        encoded = await encode_image_async(image, gen.output_format, gen.output_quality)
        return Image(seed=seed, data=encoded, width=image.shape[1], height=image.shape[0])


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(settings: GatewaySettings) -> FastAPI:
    """The FastAPI application of one gateway (its Triton connection opens with the app's lifespan)."""
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gateway.open()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="FLUX.2 [klein] gateway",
        description=f"NVIDIA NIM's and OpenAI's image APIs for the Triton model {settings.model}: text-to-image "
                    f"and editing with up to {MAX_REFERENCES} reference images.",
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

    request_schema = InferRequest.model_json_schema()

    @app.post(
        "/v1/infer", response_model=InferResponse, responses=ERRORS,
        summary="Generate or edit images (NVIDIA NIM's API)",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}}},
    )
    async def infer(request: Request):
        # The body is parsed here, not by FastAPI, so that any Content-Type is read as JSON and every message
        # names its field in this API's terms.
        request_id = request.scope["state"]["request_id"]
        body = parse_body(await request.body())
        images = await gateway.generate(body.generation(), request_id, request.scope["state"].get("caller", "?"))
        return ImagesResponse({"artifacts": [
            {"base64": Base64(image.data), "finishReason": image.finish_reason, "seed": image.seed}
            for image in images]})

    @app.get("/v1/health/live", summary="Whether the gateway's process is up")
    async def live():
        return {"status": "live"}

    @app.get("/v1/health/ready", summary="Whether Triton and the model are ready",
             responses={503: {"model": ErrorBody, "description": "not ready"}})
    async def ready():
        ok, message = await gateway.readiness()
        if ok:
            return {"status": "ready", "detail": message}
        return error_response(503, message, {"Retry-After": str(settings.retry_after_s)})

    @app.get("/v1/models", summary="The model this gateway serves")
    async def models():
        return {"object": "list", "data": [{
            "id": settings.model, "object": "model", "created": gateway.created, "owned_by": "black-forest-labs",
            "root": settings.model, "parent": None,
        }]}

    @app.get("/v1/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        body, content_type = gateway.metrics.render()
        return Response(body, media_type=content_type)

    add_openai_routes(app, gateway)
    add_docs_route(app)
    app.add_middleware(LimitsMiddleware, gateway=gateway)
    app.add_middleware(OpenAIErrors)  # outermost, so that the guard's answers on /v1/images/* are shaped too
    return app


# Swagger UI's files, served from the swagger-ui-bundle-v2 package (no CDN: an offline cluster gets a working
# page). They are served as /docs?asset=NAME: /docs is the one docs path the API key leaves open, and a
# browser can't add the key to the page's own script and style requests.
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}


def add_docs_route(app: FastAPI) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html

    @app.get("/docs", include_in_schema=False)
    async def docs(asset: str | None = None):
        if asset is None:
            return get_swagger_ui_html(
                openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
                swagger_js_url="/docs?asset=swagger-ui-bundle.js", swagger_css_url="/docs?asset=swagger-ui.css",
                swagger_favicon_url="/docs?asset=favicon-32x32.png")
        if asset not in DOCS_ASSETS:
            raise ApiError(404, f"asset: no such file {asset!r}; the docs page has {', '.join(DOCS_ASSETS)}")
        return Response(_docs_asset(asset), media_type=DOCS_ASSETS[asset],
                        headers={"Cache-Control": "public, max-age=86400"})


@functools.cache
def _docs_asset(name: str) -> bytes:
    from swagger_ui_bundle import swagger_ui_path

    return (Path(swagger_ui_path) / name).read_bytes()
