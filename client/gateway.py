"""`flux2-klein gateway`: a NIM-style HTTP API (CONTRACT.md section 4) in front of Triton's gRPC.

    flux2-klein gateway [--host 0.0.0.0] [--port 8000] [--triton-url localhost:8001] [--model flux2_klein]
                        [--max-body-bytes 64MiB] [--max-concurrency 8] [--timeout 300] [--retry-after 1]

In the container the gateway takes port 8000, so Triton's own HTTP endpoint has to move elsewhere
(e.g. `flux2-klein serve --http-port 8080`); the gateway talks to Triton over gRPC only.

Endpoints
---------
POST /v1/infer          one image (text-to-image, or editing with 1..4 reference images)
GET  /v1/health/live    200 while this process is up (never asks Triton)
GET  /v1/health/ready   200 only when Triton is ready and the model is ready; 503 otherwise
GET  /v1/models         the model served, OpenAI-style: {"object": "list", "data": [{"id": "flux2_klein", ...}]}
GET  /v1/metrics        Prometheus text format (see "Metrics")
GET  /docs, /openapi.json   the OpenAPI description (the /docs page loads Swagger UI's script from a CDN;
                        /openapi.json needs nothing from outside)

POST /v1/infer
--------------
The body is one JSON object (read as JSON whatever its Content-Type says):

    {"prompt": "a red fox in the snow",        required string (may be empty)
     "width": 1024, "height": 1024,            optional integers; the pair must be one of the 17 sizes
                                               (a missing side defaults to 1024)
     "seed": 42,                               optional integer in the INT64 range; absent or null: a random
                                               seed in 0..2**32-1, returned in the artifact (0 means 0)
     "steps": 4,                               optional integer 1..100 (default: the checkpoint's, 4 distilled / 50 base)
     "cfg_scale": 1.0,                         optional finite number >= 0 (default: the checkpoint's; ignored by
                                               distilled checkpoints)
     "image": ["<base64>", "data:image/png;base64,<base64>"],
                                               optional: up to 4 reference images for editing, each a PNG, JPEG
                                               or WebP file as plain base64 or a base64 data URL; a single
                                               string is taken as a list of one
     "output_format": "png",                   optional: "png" (default, lossless: exactly Triton's pixels),
                                               "jpeg" (quality 95) or "webp" (lossy, quality 95)
     "samples": 1}                             optional, NIM compatibility: only 1 is accepted

Answer 200: {"artifacts": [{"base64": "<the encoded image, plain base64>", "finishReason": "SUCCESS",
"seed": 42}]}. "CONTENT_FILTERED" and "ERROR" exist in the schema for NIM compatibility, but this
gateway has no content filter and reports every failure as an HTTP error instead, so a 200 always
carries "SUCCESS".

Types are strict: "width": "1024", "width": 1024.0 or "seed": true are rejected, not converted.
Unknown fields are rejected (422 naming them): a misspelt "sed" would otherwise silently give a random
seed.

Errors are JSON {"detail": "<message>"}; a message about one field starts with its name ("width: ...",
"image[1]: ..."). Every response carries an X-Request-ID header (the caller's, when it sent a sane one),
which the gateway's log lines about that request also carry.

    400  the body is empty or not JSON
    401  FLUX2_KLEIN_API_KEY is set and the request lacks "Authorization: Bearer <key>" (health and docs
         endpoints stay open; /v1/infer, /v1/models and /v1/metrics are protected)
    413  the body is larger than --max-body-bytes
    422  a field is missing, of the wrong type, unknown or out of range, an image is not base64 or not a
         decodable PNG/JPEG/WebP (Triton's INVALID_ARGUMENT, with its input names translated to ours)
    429  --max-concurrency requests are already in flight; a Retry-After header says when to retry
    500  the gateway itself failed (the log has the traceback; the answer never does)
    502  Triton failed the request (the log has Triton's message)
    503  Triton cannot be reached or the model is not ready (with Retry-After)
    504  no image within --timeout seconds

Settings: a CLI flag each, whose default comes from an environment variable
---------------------------------------------------------------------------
    --host             FLUX2_KLEIN_GATEWAY_HOST              default 0.0.0.0
    --port             FLUX2_KLEIN_GATEWAY_PORT              default 8000
    --triton-url       FLUX2_KLEIN_GATEWAY_TRITON_URL        default localhost:8001 (Triton's gRPC endpoint)
    --model            FLUX2_KLEIN_GATEWAY_MODEL             default flux2_klein
    --max-body-bytes   FLUX2_KLEIN_GATEWAY_MAX_BODY_BYTES    default 64MiB (a number of bytes; K/M/G, KiB/MiB/GiB suffixes)
    --max-concurrency  FLUX2_KLEIN_GATEWAY_MAX_CONCURRENCY   default 8 (/v1/infer requests in flight at once)
    --timeout          FLUX2_KLEIN_GATEWAY_TIMEOUT_S         default 300 (seconds per /v1/infer request)
    --retry-after      FLUX2_KLEIN_GATEWAY_RETRY_AFTER_S     default 1 (the Retry-After of 429 and 503 answers)
    --api-key          FLUX2_KLEIN_API_KEY                   default unset: no authentication. Prefer the
                                                             environment variable: a flag shows in `ps`.

The command runs in the foreground. SIGTERM or SIGINT: it stops taking requests, lets those in flight finish,
then exits (uvicorn re-raises SIGTERM once shut down, so a supervisor sees status -15/143; SIGINT gives 130).
It exits 3 when it cannot listen (e.g. the port is taken), and 2 for a bad flag or environment value.

Metrics (GET /v1/metrics)
-------------------------
    flux2_klein_gateway_requests_total{path, method, status}         counter, every answered request
    flux2_klein_gateway_request_duration_seconds{path}               histogram, time to the full answer
    flux2_klein_gateway_errors_total{path, reason}                   counter, answers >= 400 except health
        (reason: bad_request, unauthorized, not_found, method_not_allowed, body_too_large, invalid_argument,
        busy, internal, upstream_error, unavailable, timeout)
    flux2_klein_gateway_in_flight                                    gauge, /v1/infer requests being served
    flux2_klein_gateway_max_concurrency                              gauge, the configured limit
`path` is the endpoint's path, or "other" for paths that match none (bounded label values).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request, imported inside
# create_app so that the CLI does not import FastAPI) at definition time.
import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from flux2_klein.sizes import DEFAULT_SIZE, MAX_REFERENCES, SIZES, size_names

from .images import FORMATS
from .triton_client import DEFAULT_URLS, INVALID_ARGUMENT, MODEL_NAME, build_inputs, to_generation_error

log = logging.getLogger("flux2_klein.gateway")

# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------

ENV = {
    "host": "FLUX2_KLEIN_GATEWAY_HOST",
    "port": "FLUX2_KLEIN_GATEWAY_PORT",
    "triton_url": "FLUX2_KLEIN_GATEWAY_TRITON_URL",
    "model": "FLUX2_KLEIN_GATEWAY_MODEL",
    "max_body_bytes": "FLUX2_KLEIN_GATEWAY_MAX_BODY_BYTES",
    "max_concurrency": "FLUX2_KLEIN_GATEWAY_MAX_CONCURRENCY",
    "timeout_s": "FLUX2_KLEIN_GATEWAY_TIMEOUT_S",
    "retry_after_s": "FLUX2_KLEIN_GATEWAY_RETRY_AFTER_S",
    "api_key": "FLUX2_KLEIN_API_KEY",
}
DEFAULTS = {
    "host": "0.0.0.0",
    "port": "8000",
    "triton_url": DEFAULT_URLS["grpc"],
    "model": MODEL_NAME,
    "max_body_bytes": "64MiB",
    "max_concurrency": "8",
    "timeout_s": "300",
    "retry_after_s": "1",
}
READY_TIMEOUT_S = 3.0  # how long /v1/health/ready waits for Triton's answers
RANDOM_SEED_BOUND = 2**32  # random seeds are 0..2**32-1, as NIM's image APIs use
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MIN_STEPS, MAX_STEPS = 1, 100  # CONTRACT.md section 3; Triton checks them again
OUTPUT_FORMATS = {"png": ".png", "jpeg": ".jpeg", "webp": ".webp"}


@dataclass(frozen=True)
class GatewaySettings:
    triton_url: str = DEFAULT_URLS["grpc"]
    model: str = MODEL_NAME
    max_body_bytes: int = 64 << 20
    max_concurrency: int = 8
    timeout_s: float = 300.0
    retry_after_s: int = 1
    api_key: str | None = None

    def __post_init__(self):
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive; got {self.max_body_bytes}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1; got {self.max_concurrency}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a positive number of seconds; got {self.timeout_s}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0; got {self.retry_after_s}")


_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_bytes(text: str) -> int:
    """'67108864', '64MiB', '50M', '1.5GB' -> bytes; an argparse type."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _BYTE_UNITS or int(float(m.group(1)) * _BYTE_UNITS[unit]) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected a positive number of bytes, optionally with a unit (K, M, G, KiB, MiB, GiB); got {text!r}")
    return int(float(m.group(1)) * _BYTE_UNITS[unit])


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds; got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0..65535; got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# The request body
# ---------------------------------------------------------------------------------------------------------------

def _request_model():
    """InferRequest, built on first use so that importing this module needs no pydantic."""
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class InferRequest(BaseModel):
        """The body of POST /v1/infer."""

        model_config = ConfigDict(extra="forbid", strict=True)

        prompt: str = Field(description="the text prompt (UTF-8; may be empty)")
        width: int | None = Field(None, description=f"output width; with height one of: {size_names()}",
                                  examples=[1024])
        height: int | None = Field(None, description="output height (default 1024)", examples=[1024])
        seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX,
                                 description="noise seed; absent or null: random (returned in the artifact)")
        steps: int | None = Field(None, ge=MIN_STEPS, le=MAX_STEPS,
                                  description="denoising steps (default: 4 distilled, 50 base)")
        cfg_scale: float | None = Field(None, ge=0, allow_inf_nan=False,
                                        description="guidance scale (default: 1.0, ignored, distilled; 4.0 base)")
        image: list[str] | None = Field(
            None, max_length=MAX_REFERENCES,
            description=f"up to {MAX_REFERENCES} reference images for editing: PNG, JPEG or WebP files as base64 "
                        "or data URLs (data:image/png;base64,...); a single string counts as a list of one",
        )
        output_format: Literal["png", "jpeg", "webp"] = Field(
            "png", description="encoding of the answered image: png (lossless, default), jpeg or webp")
        samples: Literal[1] = Field(1, description="images per request; only 1 (NIM compatibility)")

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

    return InferRequest


class ApiError(Exception):
    """An answer other than 200, raised anywhere while serving a request."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def _describe_input(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_name(loc) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("list[str]", "str"):  # a union member's tag, not a field
            continue
        else:
            name += ("." if name else "") + str(part)
    return name or "body"


def validation_detail(errors: list[dict], allowed: list[str]) -> str:
    """pydantic's errors as one message, each part naming its field: 'width: Input should be ... got "big"'."""
    parts = []
    for err in errors:
        field = _field_name(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            parts.append(f"{field}: unknown field; allowed fields: {', '.join(allowed)}")
        elif kind == "missing":
            parts.append(f"{field}: required")
        elif kind == "too_long" and "max_length" in err.get("ctx", {}):
            ctx = err["ctx"]
            things = "images" if field == "image" else "entries"
            parts.append(f"{field}: at most {ctx['max_length']} {things}, got {ctx.get('actual_length', 'more')}")
        else:
            message = err.get("msg", "invalid")
            if "input" in err:
                message += f"; got {_describe_input(err['input'])}"
            parts.append(f"{field}: {message}")
    return "; ".join(parts)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes, model) -> Any:
    """The request body as a validated InferRequest, or ApiError 400 (not JSON) / 422 (not valid)."""
    from pydantic import ValidationError

    if not raw.strip():
        raise ApiError(400, 'request body is empty; expected a JSON object such as {"prompt": "a red fox"}')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 text (invalid byte at offset {e.start}); send JSON") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # NaN, Infinity
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise ApiError(422, f'request body must be a JSON object such as {{"prompt": "a red fox"}}; got {kind}')
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, validation_detail(e.errors(include_url=False), list(model.model_fields))) from None
    try:
        request.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(422, f"prompt: not valid Unicode text (a lone surrogate at character {e.start})") from None
    return request


_DATA_URL = re.compile(r"data:(?P<mime>[^,;]*)(?P<params>(?:;[^,;]*)*),(?P<data>.*)", re.DOTALL | re.IGNORECASE)
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/=_-]*")


def decode_image(text: str, index: int) -> bytes:
    """One entry of "image": plain base64 (standard or URL-safe, padding optional, whitespace ignored) or a
    base64 data URL of an image type -> the file's bytes. Whether they are a decodable image is Triton's call."""
    field = f"image[{index}]"
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


def check_size(width: int | None, height: int | None) -> None:
    if width is None and height is None:
        return
    pair = (DEFAULT_SIZE[0] if width is None else width, DEFAULT_SIZE[1] if height is None else height)
    if pair not in SIZES:
        raise ApiError(422, f"width/height: {pair[0]}x{pair[1]} (width x height) is not supported; allowed: "
                            f"{size_names()}")


# Triton's input names, as they start its INVALID_ARGUMENT messages, -> this API's field names.
_FIELD_NAMES = [
    (re.compile(r"\breference_images\b"), "image"),
    (re.compile(r"\bnum_inference_steps\b"), "steps"),
    (re.compile(r"\bguidance_scale\b"), "cfg_scale"),
    (re.compile(r"\bheight/width\b"), "width/height"),
]


def api_message(triton_message: str) -> str:
    """A Triton INVALID_ARGUMENT message in this API's field names: 'reference_images[0]: ...' -> 'image[0]: ...'."""
    message = triton_message.strip()
    # The ensemble prefixes its step's message ("in ensemble 'flux2_klein', ..."): keep what names the field.
    m = re.search(r"\b(prompt|height/width|width|height|seed|num_inference_steps|guidance_scale|"
                  r"reference_images(?:\[\d+\])?):", message)
    if m:
        message = message[m.start():]
    for pattern, name in _FIELD_NAMES:
        message = pattern.sub(name, message)
    return message


def encode_image(array, fmt: str) -> bytes:
    from PIL import Image

    pil_format, options = FORMATS[OUTPUT_FORMATS[fmt]]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=pil_format, **options)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

PATHS = ("/v1/infer", "/v1/health/live", "/v1/health/ready", "/v1/models", "/v1/metrics", "/docs",
         "/docs/oauth2-redirect", "/openapi.json")
OPEN_PATHS = frozenset({"/v1/health/live", "/v1/health/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
HEALTH_PATHS = frozenset({"/v1/health/live", "/v1/health/ready"})
REASONS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
           413: "body_too_large", 422: "invalid_argument", 429: "busy", 500: "internal", 502: "upstream_error",
           503: "unavailable", 504: "timeout"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)


class Metrics:
    """The gateway's Prometheus metrics, in a registry of their own (several gateways may share a process)."""

    def __init__(self, max_concurrency: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        p = "flux2_klein_gateway_"
        self.requests = Counter(p + "requests", "HTTP requests answered, by path, method and status code",
                                ["path", "method", "status"], registry=self.registry)
        self.latency = Histogram(p + "request_duration_seconds", "Time from a request's arrival to its full answer",
                                 ["path"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter(p + "errors", "Answers with a status >= 400 (health endpoints left out), by reason",
                              ["path", "reason"], registry=self.registry)
        self.in_flight = Gauge(p + "in_flight", "/v1/infer requests being served", registry=self.registry)
        self.limit = Gauge(p + "max_concurrency", "The most /v1/infer requests served at once",
                           registry=self.registry)
        self.limit.set(max_concurrency)

    def observe(self, path: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(path, method, str(status)).inc()
        self.latency.labels(path).observe(seconds)
        if status >= 400 and path not in HEALTH_PATHS:
            self.errors.labels(path, REASONS.get(status, f"http_{status}")).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------------------------------------------
# Limits: one ASGI middleware, outside FastAPI's routing so that it answers before a body is read
# ---------------------------------------------------------------------------------------------------------------

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class LimitsMiddleware:
    """Request ids, metrics, the API key, the body size limit and the concurrency limit, in that order."""

    def __init__(self, app, gateway: "Gateway"):
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gw = self.gateway
        start = time.perf_counter()
        path = scope["path"] if scope["path"] in PATHS else "other"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id", "")
        if not _REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status_box = [500]
        started = [False]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                started[0] = True
                status_box[0] = message["status"]
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        admitted = False
        try:
            # The API key, checked in constant time.
            if gw.settings.api_key and scope["path"] not in OPEN_PATHS:
                auth = headers.get("authorization", "")
                scheme, _, token = auth.partition(" ")
                if not auth:
                    await _send_json(send_wrapper, 401, {
                        "detail": "authorization required: send the header 'Authorization: Bearer <API key>'"},
                        {"WWW-Authenticate": "Bearer"})
                    return
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                        token.strip().encode("latin-1"), gw.settings.api_key.encode()):
                    await _send_json(send_wrapper, 401, {
                        "detail": "invalid API key: send the header 'Authorization: Bearer <API key>'"},
                        {"WWW-Authenticate": 'Bearer error="invalid_token"'})
                    return

            # The body size, from Content-Length before a byte is read; counted while reading otherwise.
            limit = gw.settings.max_body_bytes
            too_large = (f"request body too large: more than {limit} bytes (the gateway's --max-body-bytes / "
                         f"{ENV['max_body_bytes']})")
            length = headers.get("content-length")
            if length is not None:
                if not length.strip().isdigit():
                    await _send_json(send_wrapper, 400, {"detail": f"invalid Content-Length header {length!r}"})
                    return
                if int(length) > limit:
                    await _send_json(send_wrapper, 413, {"detail": too_large}, {"Connection": "close"})
                    return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        from starlette.exceptions import HTTPException

                        raise HTTPException(413, too_large)
                return message

            # The concurrency limit, only for /v1/infer: health and metrics must answer while it is full.
            if scope["path"] == "/v1/infer" and scope["method"] == "POST":
                if gw.in_flight >= gw.settings.max_concurrency:
                    await _send_json(send_wrapper, 429, {
                        "detail": f"too many requests in flight: at most {gw.settings.max_concurrency} at once "
                                  f"(the gateway's --max-concurrency / {ENV['max_concurrency']}); retry later"},
                        {"Retry-After": str(gw.settings.retry_after_s)})
                    return
                admitted = True
                gw.in_flight += 1
                gw.metrics.in_flight.inc()
            await self.app(scope, limited_receive, send_wrapper)
        except Exception:
            if not started[0]:
                log.exception("request %s: unhandled error", request_id)
                await _send_json(send_wrapper, 500, {
                    "detail": f"internal error in the gateway (request {request_id}); its log has the details"})
            else:
                raise
        finally:
            if admitted:
                gw.in_flight -= 1
                gw.metrics.in_flight.dec()
            gw.metrics.observe(path, scope["method"], status_box[0], time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------------------------

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

    async def infer(self, request, request_id: str) -> dict:
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
                    s.model, inputs, outputs=[grpcclient.InferRequestedOutput("image")], request_id=request_id,
                    client_timeout=max(deadline - time.monotonic(), 0.001),
                )
                image = result.as_numpy("image")
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


def create_app(settings: GatewaySettings):
    """The FastAPI application of one gateway (its Triton connection opens with the app's lifespan)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException as StarletteHTTPException

    InferRequest = _request_model()
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
        description="A NIM-style HTTP API for the Triton model flux2_klein: text-to-image and editing with up to "
                    "4 reference images.",
        version="1",
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.gateway = gateway

    class Artifact(BaseModel):
        base64: str
        finishReason: Literal["SUCCESS", "CONTENT_FILTERED", "ERROR"]
        seed: int

    class InferResponse(BaseModel):
        artifacts: list[Artifact]

    class ErrorBody(BaseModel):
        detail: str

    def error_response(status: int, detail: str, headers: dict[str, str] | None = None):
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

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

    errors = {status: {"model": ErrorBody, "description": what} for status, what in {
        400: "the body is empty or not JSON", 401: "missing or wrong API key", 413: "the body is too large",
        422: "a field is missing, of the wrong type, unknown or not allowed; the message names it",
        429: "too many requests in flight (Retry-After)", 500: "the gateway failed",
        502: "Triton failed the request", 503: "Triton or the model is not ready (Retry-After)",
        504: "no image within the gateway's timeout"}.items()}
    request_schema = InferRequest.model_json_schema()

    @app.post(
        "/v1/infer", response_model=InferResponse, responses=errors, summary="Generate or edit one image",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}}},
    )
    async def infer(request: Request):
        # The body is parsed here, not by FastAPI, so that any Content-Type is read as JSON and every message
        # names its field in this API's terms.
        request_id = request.scope["state"]["request_id"]
        body = parse_body(await request.body(), InferRequest)
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


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------

def _env_default(key: str) -> str | None:
    return os.environ.get(ENV[key], DEFAULTS.get(key))


def add_gateway_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `gateway` subcommand on an argparse subparsers object; its func is run_gateway.
    Each flag's default is read from its environment variable (see the module's docstring) when this runs."""
    g = subparsers.add_parser(
        "gateway",
        help="serve the NIM-style HTTP API (POST /v1/infer, health, models, metrics) in front of Triton's gRPC",
        description="A NIM-style HTTP gateway in front of Triton's gRPC endpoint. Every flag defaults to its "
                    "environment variable, named in its help.",
    )

    def env_help(text: str, key: str) -> str:
        return f"{text} (env {ENV[key]}; default {DEFAULTS.get(key, 'unset')})"

    def typed(convert, key: str):
        """convert, whose error also names the environment variable, since the value may have come from there."""
        def parse(text: str):
            try:
                return convert(text)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{e} (from the flag, or else from {ENV[key]})") from None
        parse.__name__ = convert.__name__
        return parse

    g.add_argument("--host", default=_env_default("host"), help=env_help("address to listen on", "host"))
    g.add_argument("--port", type=typed(_port, "port"), default=_env_default("port"),
                   help=env_help("HTTP port; Triton's own HTTP port must then be another", "port"))
    g.add_argument("--triton-url", default=_env_default("triton_url"), metavar="HOST:PORT",
                   help=env_help("Triton's gRPC endpoint", "triton_url"))
    g.add_argument("--model", default=_env_default("model"), help=env_help("the Triton model to call", "model"))
    g.add_argument("--max-body-bytes", type=typed(parse_bytes, "max_body_bytes"), default=_env_default("max_body_bytes"), metavar="N",
                   help=env_help("largest request body; larger ones get 413", "max_body_bytes"))
    g.add_argument("--max-concurrency", type=typed(_positive_int, "max_concurrency"), default=_env_default("max_concurrency"), metavar="N",
                   help=env_help("most /v1/infer requests in flight; more get 429", "max_concurrency"))
    g.add_argument("--timeout", type=typed(_positive_seconds, "timeout_s"), default=_env_default("timeout_s"), metavar="S",
                   help=env_help("seconds a /v1/infer request may take; then 504", "timeout_s"))
    g.add_argument("--retry-after", type=typed(_non_negative_int, "retry_after_s"), default=_env_default("retry_after_s"), metavar="S",
                   help=env_help("the Retry-After seconds of 429 and 503 answers", "retry_after_s"))
    g.add_argument("--api-key", default=os.environ.get(ENV["api_key"]) or None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' (health and docs stay open); prefer the env "
                        f"variable {ENV['api_key']}, since a flag shows in the process list (default: unset, open)")
    g.set_defaults(func=run_gateway)
    return g


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(
        triton_url=args.triton_url, model=args.model, max_body_bytes=args.max_body_bytes,
        max_concurrency=args.max_concurrency, timeout_s=args.timeout, retry_after_s=args.retry_after,
        api_key=args.api_key or None,
    )


def run_gateway(args: argparse.Namespace) -> int:
    """Run the gateway in the foreground until SIGINT/SIGTERM; 0 on a clean stop."""
    import uvicorn

    settings = settings_from_args(args)
    app = create_app(settings)
    log.info("gateway on http://%s:%d -> Triton gRPC %s, model %s (auth %s, at most %d in flight, timeout %g s)",
             args.host, args.port, settings.triton_url, settings.model, "on" if settings.api_key else "off",
             settings.max_concurrency, settings.timeout_s)
    verbose = getattr(args, "verbose", False)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="debug" if verbose else "info"))
    server.run()
    return 0 if server.started else 1


__all__ = [
    "add_gateway_parser", "run_gateway", "create_app", "GatewaySettings", "Gateway", "parse_bytes", "ENV",
]
