"""The gateway's application: its connection to Triton (`Gateway`) and the routes (`create_app`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from flux2_klein.contract import OUTPUT
from flux2_klein.sizes import MAX_REFERENCES

from ..triton_client import INVALID_ARGUMENT, build_inputs, to_generation_error
from .body import (
    RANDOM_SEED_BOUND, ApiError, InferRequest, api_message, check_size, decode_image, encode_image, parse_body,
    validation_detail,
)
from .guard import LimitsMiddleware
from .metrics import Metrics
from .settings import ENV, GatewaySettings

log = logging.getLogger("flux2_klein.gateway")

READY_TIMEOUT_S = 3.0  # how long /v1/health/ready waits for Triton's answers


class Artifact(BaseModel):
    base64: str
    finishReason: Literal["SUCCESS", "CONTENT_FILTERED", "ERROR"]
    seed: int


class InferResponse(BaseModel):
    artifacts: list[Artifact]


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

    # -- /v1/infer ----------------------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, request_id: str) -> dict:
        """A validated InferRequest -> the answer's JSON; ApiError for every failure."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        s = self.settings
        check_size(request.width, request.height)
        references = [decode_image(text, i) for i, text in enumerate(request.image or [])]
        seed = request.seed if request.seed is not None else secrets.randbelow(RANDOM_SEED_BOUND)
        inputs = build_inputs(
            request.prompt, width=request.width, height=request.height, seed=seed, steps=request.steps,
            guidance=request.cfg_scale, references=references, protocol="grpc",
        )
        deadline = time.monotonic() + s.timeout_s
        timeout_detail = f"no image within {s.timeout_s:g} s (the gateway's --timeout / {ENV['timeout_s']})"
        try:
            async with asyncio.timeout(s.timeout_s):
                result = await self.client.infer(
                    s.model, inputs, outputs=[grpcclient.InferRequestedOutput(OUTPUT.name)], request_id=request_id,
                    client_timeout=max(deadline - time.monotonic(), 0.001),
                )
                image = result.as_numpy(OUTPUT.name)
                if image is None or image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 3:
                    got = "nothing" if image is None else f"{image.dtype} {list(image.shape)}"
                    log.error("request %s: %s answered %s for 'image'", request_id, s.model, got)
                    raise ApiError(502, f"the inference server answered an unusable image (request {request_id})")
                encoded = await asyncio.to_thread(encode_image, image, request.output_format)
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
        return {"artifacts": [{"base64": base64.b64encode(encoded).decode("ascii"), "finishReason": "SUCCESS",
                               "seed": seed}]}


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
        description=f"A NIM-style HTTP API for the Triton model {settings.model}: text-to-image and editing with "
                    f"up to {MAX_REFERENCES} reference images.",
        version="1",
        lifespan=lifespan,
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
        "/v1/infer", response_model=InferResponse, responses=ERRORS, summary="Generate or edit one image",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}}},
    )
    async def infer(request: Request):
        # The body is parsed here, not by FastAPI, so that any Content-Type is read as JSON and every message
        # names its field in this API's terms.
        request_id = request.scope["state"]["request_id"]
        body = parse_body(await request.body())
        answer = await gateway.infer(body, request_id)
        return JSONResponse(answer)

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

    app.add_middleware(LimitsMiddleware, gateway=gateway)
    return app
