"""The gateway's Prometheus metrics (GET /v1/metrics), in a registry of their own. Every count the gateway
keeps is recorded here, through `Metrics`' methods: the guard and the services say what happened, this
file says which series it goes to."""

from __future__ import annotations

import contextlib

PATHS = ("/v1/infer", "/v1/health/live", "/v1/health/ready", "/v1/models", "/v1/loras", "/v1/metrics", "/docs",
         "/docs/oauth2-redirect", "/openapi.json", "/v1/images/generations", "/v1/images/edits")
# The requests that generate images: each takes a concurrency slot, once its body is read (guard.py).
GENERATING_PATHS = frozenset({"/v1/infer", "/v1/images/generations", "/v1/images/edits"})
HEALTH_PATHS = frozenset({"/v1/health/live", "/v1/health/ready"})
REASONS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "body_timeout",
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
        self.in_flight = Gauge(p + "in_flight", "Image requests (/v1/infer, /v1/images/*) being served", registry=self.registry)
        self.queued = Gauge(p + "queued", "Image requests waiting for a slot", registry=self.registry)
        self.limit = Gauge(p + "max_concurrency", "The most image requests served at once",
                           registry=self.registry)
        self.limit.set(max_concurrency)
        # By the API key's name only (never by client address: that would be unbounded).
        self.by_key = Counter(p + "key_requests", "Image requests by named API key, and how they ended",
                              ["key", "outcome"], registry=self.registry)

    def answered(self, path: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered (any path; those the gateway does not serve count as "other")."""
        path = path if path in PATHS else "other"
        self.requests.labels(path, method, str(status)).inc()
        self.latency.labels(path).observe(seconds)
        if status >= 400 and path not in HEALTH_PATHS:
            self.errors.labels(path, REASONS.get(status, f"http_{status}")).inc()

    @contextlib.contextmanager
    def waiting(self):
        """An image request waiting for a concurrency slot, for as long as the block runs."""
        self.queued.inc()
        try:
            yield
        finally:
            self.queued.dec()

    def started(self) -> None:
        """An image request took a slot."""
        self.in_flight.inc()

    def finished(self) -> None:
        """An image request gave its slot back."""
        self.in_flight.dec()

    def outcome(self, key: str | None, outcome: str) -> None:
        """How one image request ended, for a named API key (None: a caller known by address, not counted)."""
        if key is not None:
            self.by_key.labels(key, outcome).inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
