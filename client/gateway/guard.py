"""The guard: one ASGI middleware, outside FastAPI's routing so that it answers before a body is read. Its
stages, in order, each a named step below: the request id; the API key (`authenticate`, naming the
`Caller`); the rate limit (`check_rate`); the body's size and arrival (`BodyLimit`); and for image requests
a concurrency slot (`Slots`). What happens is counted through the gateway's `Metrics`, never here.

An image request's body (/v1/infer, /v1/images/*) is read whole, within the body timeout, before the request
takes a concurrency slot: a client that sends headers and stalls holds a connection, never a slot. With
every slot taken a request waits (at most `max_queue` of them, `queue_timeout_s` each) before 429."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING

from .access import Caller, KeyStore, RateLimiter, retry_after_header
from .metrics import GENERATING_PATHS, Metrics
from .settings import ENV, GatewaySettings

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("flux2_klein.gateway")

OPEN_PATHS = frozenset({"/v1/health/live", "/v1/health/ready", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class Refused(Exception):
    """A stage's answer in place of the app's: the status, its {"detail"} and headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail)
        self.status, self.detail, self.headers = status, detail, headers


class ClientGone(Exception):
    """The client went away before its body was read."""


async def _send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def request_id(headers: dict[str, str]) -> str:
    """The client's X-Request-ID when it is a sane one, else a new one."""
    given = headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def authenticate(settings: GatewaySettings, keys: KeyStore | None, scope, headers: dict[str, str]) -> Caller:
    """Who sent the request. With an API key set, the key is checked (in constant time) on every path but
    OPEN_PATHS; with named keys, which one (for its limit, the metrics and the log). Refused 401 otherwise."""
    address = Caller.at((scope.get("client") or ("?",))[0])
    if not (settings.api_key or keys) or scope["path"] in OPEN_PATHS:
        return address
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if not auth:
        raise Refused(401, "authorization required: send the header 'Authorization: Bearer <API key>'",
                      {"WWW-Authenticate": "Bearer"})
    bearer = scheme.lower() == "bearer"
    key = keys.lookup(token.strip()) if keys and bearer else None
    valid = key is not None if keys else bearer and hmac.compare_digest(
        token.strip().encode("latin-1"), settings.api_key.encode())
    if not valid:
        raise Refused(401, "invalid API key: send the header 'Authorization: Bearer <API key>'",
                      {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return Caller.of_key(key.name, key.per_minute) if key else Caller.of_key("default")


def check_rate(rate: RateLimiter | None, settings: GatewaySettings, caller: Caller, path: str,
               request_id: str) -> None:
    """Requests a minute per key (per address without keys), for image requests: abuse meets 429 before any
    work."""
    if rate is None or path not in GENERATING_PATHS:
        return
    admission = rate.acquire(caller.label, caller.per_minute)
    if not admission.allowed:
        log.info("request %s: %s over its rate limit", request_id, caller)
        raise Refused(429, f"rate limit: {caller.per_minute or settings.rate_per_minute} requests a minute for "
                           f"{caller}; retry after the Retry-After seconds",
                      {"Retry-After": retry_after_header(admission)})


class BodyLimit:
    """The body's size: from Content-Length before a byte is read, counted while reading otherwise; and for
    an image request, its whole arrival within the body timeout."""

    def __init__(self, settings: GatewaySettings):
        self.limit, self.timeout_s = settings.max_body_bytes, settings.body_timeout_s
        self.too_large = (f"request body too large: more than {self.limit} bytes (the gateway's --max-body-bytes / "
                          f"{ENV['max_body_bytes']})")

    def check_length(self, headers: dict[str, str]) -> None:
        length = headers.get("content-length")
        if length is None:
            return
        if not length.strip().isdigit():
            raise Refused(400, f"invalid Content-Length header {length!r}")
        if int(length) > self.limit:
            raise Refused(413, self.too_large, {"Connection": "close"})

    def counted(self, receive):
        """`receive` for the app, which raises 413 (as the app's own HTTPException) past the limit."""
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, self.too_large)
            return message

        return limited_receive

    async def read_whole(self, receive) -> bytes:
        """The whole body within the body timeout; Refused 413 / 408, or ClientGone."""
        try:
            return await asyncio.wait_for(self._read(receive), self.timeout_s)
        except TimeoutError:
            raise Refused(408, f"request body not received within {self.timeout_s:g} s (the gateway's "
                               f"--body-timeout / {ENV['body_timeout_s']})", {"Connection": "close"}) from None

    async def _read(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise Refused(413, self.too_large, {"Connection": "close"})
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def replay(body: bytes, receive):
    """`receive` for the app: the body already read, then the connection's own messages (a disconnect)."""
    replayed = False

    async def replaying():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replaying


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


class Exchange:
    """One HTTP request as the guard sees it: its headers and id, and what status it was answered with."""

    def __init__(self, scope, send):
        self.scope = scope
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        self.request_id = request_id(self.headers)
        scope.setdefault("state", {})["request_id"] = self.request_id
        self.status = 500  # until an answer starts
        self.started = False
        self.admitted = False  # holds a concurrency slot
        self._send = send

    async def send(self, message) -> None:
        """The app's `send`: the answer carries X-Request-ID, and its status is noted for the metrics."""
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            message = dict(message)
            message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", self.request_id.encode())]
        await self._send(message)

    async def refuse(self, refused: Refused) -> None:
        await _send_json(self.send, refused.status, {"detail": refused.detail}, refused.headers)


class LimitsMiddleware:
    """The guard's stages around the app, in the order of the module's docstring."""

    def __init__(self, app, gateway: Gateway):
        self.app = app
        self.settings: GatewaySettings = gateway.settings
        self.metrics: Metrics = gateway.metrics
        self.keys, self.rate = gateway.keys, gateway.rate
        s = self.settings
        self.body = BodyLimit(s)
        self.slots = Slots(s.max_concurrency, s.max_queue, s.queue_timeout_s)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, path = time.perf_counter(), scope["path"]
        ex = Exchange(scope, send)
        try:
            try:
                await self._guarded(ex, receive)
            except Refused as refused:
                await ex.refuse(refused)
            except ClientGone:
                log.info("request %s: the client disconnected before sending its whole body", ex.request_id)
                ex.status = 499  # nginx's "client closed request", for the metrics only
        except Exception:
            if ex.started:
                raise
            log.exception("request %s: unhandled error", ex.request_id)
            await _send_json(ex.send, 500, {
                "detail": f"internal error in the gateway (request {ex.request_id}); its log has the details"})
        finally:
            if ex.admitted:
                await self._leave()
            self.metrics.answered(path, scope["method"], ex.status, time.perf_counter() - start)

    async def _guarded(self, ex: Exchange, receive) -> None:
        scope, path = ex.scope, ex.scope["path"]
        caller = authenticate(self.settings, self.keys, scope, ex.headers)
        scope["state"]["caller"] = caller
        check_rate(self.rate, self.settings, caller, path, ex.request_id)
        self.body.check_length(ex.headers)
        # The concurrency limit, only for image requests: health and metrics must answer while it is full.
        if path in GENERATING_PATHS and scope["method"] == "POST":
            body = await self.body.read_whole(receive)
            await self._admit(ex)
            await self.app(scope, replay(body, receive), ex.send)
        else:
            await self.app(scope, self.body.counted(receive), ex.send)

    async def _admit(self, ex: Exchange) -> None:
        """A concurrency slot, waiting in the queue if need be; Refused 429 when none comes."""
        with self.metrics.waiting():
            ex.admitted = await self.slots.acquire()
        if not ex.admitted:
            s = self.settings
            raise Refused(429, f"too many requests in flight: at most {s.max_concurrency} at once and "
                               f"{s.max_queue} waiting up to {s.queue_timeout_s:g} s (the gateway's "
                               f"--max-concurrency / {ENV['max_concurrency']}, --max-queue, --queue-timeout); "
                               "retry later", {"Retry-After": str(s.retry_after_s)})
        self.metrics.started()

    async def _leave(self) -> None:
        self.metrics.finished()
        await self.slots.release()
