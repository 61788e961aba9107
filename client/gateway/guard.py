"""Request ids, the API key, the body size limit and the concurrency limit: one ASGI middleware, outside
FastAPI's routing so that it answers before a body is read; it also feeds the metrics.

An image request's body (/v1/infer, /v1/images/*) is read whole, within the body timeout, before the request takes a concurrency slot: a
client that sends headers and stalls holds a connection, never a slot. With every slot taken a request
waits (at most `max_queue` of them, `queue_timeout_s` each) before 429."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING

from .metrics import GENERATING_PATHS, PATHS
from .settings import ENV

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("flux2_klein.gateway")

OPEN_PATHS = frozenset({"/v1/health/live", "/v1/health/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class _Disconnected(Exception):
    """The client went away before its body was read."""


class _TooLarge(Exception):
    pass


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class Slots:
    """`limit` requests at once; up to `queue` more wait up to `wait_s` seconds for one."""

    def __init__(self, limit: int, queue: int, wait_s: float):
        self.limit, self.queue, self.wait_s = limit, queue, wait_s
        self.in_use = self.waiting = 0
        self._freed = asyncio.Condition()

    async def acquire(self) -> bool:
        if self.in_use < self.limit:
            self.in_use += 1
            return True
        if self.waiting >= self.queue or self.wait_s <= 0:
            return False
        self.waiting += 1
        try:
            async with self._freed:
                await asyncio.wait_for(self._freed.wait_for(lambda: self.in_use < self.limit), self.wait_s)
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
        self.in_use += 1
        return True

    async def release(self) -> None:
        self.in_use -= 1
        async with self._freed:
            self._freed.notify()


class LimitsMiddleware:
    """Request ids, metrics, the API key, the body size limit and the concurrency limit, in that order."""

    def __init__(self, app, gateway: Gateway):
        self.app = app
        self.gateway = gateway
        s = gateway.settings
        self.slots = Slots(s.max_concurrency, s.max_queue, s.queue_timeout_s)

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
            # The API key, checked in constant time; with named keys, which one (for limits and the log).
            caller, per_minute = f"address {(scope.get('client') or ('?',))[0]}", None
            if (gw.settings.api_key or gw.keys) and scope["path"] not in OPEN_PATHS:
                auth = headers.get("authorization", "")
                scheme, _, token = auth.partition(" ")
                if not auth:
                    await _send_json(send_wrapper, 401, {
                        "detail": "authorization required: send the header 'Authorization: Bearer <API key>'"},
                        {"WWW-Authenticate": "Bearer"})
                    return
                key = gw.keys.lookup(token.strip()) if gw.keys and scheme.lower() == "bearer" else None
                valid = key is not None if gw.keys else scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip().encode("latin-1"), gw.settings.api_key.encode())
                if not valid:
                    await _send_json(send_wrapper, 401, {
                        "detail": "invalid API key: send the header 'Authorization: Bearer <API key>'"},
                        {"WWW-Authenticate": 'Bearer error="invalid_token"'})
                    return
                caller, per_minute = (f"key {key.name}", key.per_minute) if key else ("key default", None)
            scope["state"]["caller"] = caller

            # Requests a minute per key (per address without keys): abuse meets 429 before any work.
            if gw.rate is not None and scope["path"] in GENERATING_PATHS:
                from flux2_klein.guardrail.limits import retry_after_header

                admission = gw.rate.acquire(caller, per_minute)
                if not admission.allowed:
                    log.info("request %s: %s over its rate limit", request_id, caller)
                    await _send_json(send_wrapper, 429, {
                        "detail": f"rate limit: {per_minute or gw.settings.rate_per_minute} requests a minute for "
                                  f"{caller}; retry after the Retry-After seconds"},
                        {"Retry-After": retry_after_header(admission)})
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

            # The concurrency limit, only for image requests: health and metrics must answer while it is full.
            if scope["path"] in GENERATING_PATHS and scope["method"] == "POST":
                s = gw.settings
                try:
                    body = await asyncio.wait_for(_read_body(receive, limit), s.body_timeout_s)
                except _Disconnected:
                    log.info("request %s: the client disconnected before sending its whole body", request_id)
                    status_box[0] = 499  # nginx's "client closed request", for the metrics only
                    return
                except _TooLarge:
                    await _send_json(send_wrapper, 413, {"detail": too_large}, {"Connection": "close"})
                    return
                except TimeoutError:
                    await _send_json(send_wrapper, 408, {
                        "detail": f"request body not received within {s.body_timeout_s:g} s (the gateway's "
                                  f"--body-timeout / {ENV['body_timeout_s']})"}, {"Connection": "close"})
                    return
                gw.metrics.queued.inc()
                try:
                    admitted = await self.slots.acquire()
                finally:
                    gw.metrics.queued.dec()
                if not admitted:
                    await _send_json(send_wrapper, 429, {
                        "detail": f"too many requests in flight: at most {s.max_concurrency} at once and "
                                  f"{s.max_queue} waiting up to {s.queue_timeout_s:g} s (the gateway's "
                                  f"--max-concurrency / {ENV['max_concurrency']}, --max-queue, --queue-timeout); "
                                  "retry later"},
                        {"Retry-After": str(s.retry_after_s)})
                    return
                gw.in_flight += 1
                gw.metrics.in_flight.inc()
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                await self.app(scope, replay, send_wrapper)
                return
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
                await self.slots.release()
            gw.metrics.observe(path, scope["method"], status_box[0], time.perf_counter() - start)
