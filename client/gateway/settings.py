"""The gateway's settings: a flag each, whose default comes from an environment variable (`ENV`)."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass

from flux2_klein.contract import MODEL_NAME

from ..triton_client import DEFAULT_URLS

ENV = {
    "host": "FLUX2_KLEIN_GATEWAY_HOST",
    "port": "FLUX2_KLEIN_GATEWAY_PORT",
    "triton_url": "FLUX2_KLEIN_GATEWAY_TRITON_URL",
    "model": "FLUX2_KLEIN_GATEWAY_MODEL",
    "max_body_bytes": "FLUX2_KLEIN_GATEWAY_MAX_BODY_BYTES",
    "max_concurrency": "FLUX2_KLEIN_GATEWAY_MAX_CONCURRENCY",
    "max_queue": "FLUX2_KLEIN_GATEWAY_MAX_QUEUE",
    "queue_timeout_s": "FLUX2_KLEIN_GATEWAY_QUEUE_TIMEOUT_S",
    "body_timeout_s": "FLUX2_KLEIN_GATEWAY_BODY_TIMEOUT_S",
    "timeout_s": "FLUX2_KLEIN_GATEWAY_TIMEOUT_S",
    "retry_after_s": "FLUX2_KLEIN_GATEWAY_RETRY_AFTER_S",
    "api_key": "FLUX2_KLEIN_API_KEY",
    "api_keys": "FLUX2_KLEIN_API_KEYS",
    "api_keys_file": "FLUX2_KLEIN_GATEWAY_API_KEYS_FILE",
    "rate_per_minute": "FLUX2_KLEIN_GATEWAY_RATE_PER_MINUTE",
}
DEFAULTS = {
    "host": "0.0.0.0",
    "port": "8000",
    "triton_url": DEFAULT_URLS["grpc"],
    "model": MODEL_NAME,
    "max_body_bytes": "64MiB",
    "max_concurrency": "8",
    # A short wait for a slot before 429: a burst just over the limit queues for seconds instead of
    # retrying for minutes; the queue is bounded so that a flood still meets 429 at once.
    "max_queue": "8",
    "queue_timeout_s": "10",
    # A client that sends headers and then stalls holds a connection, never a slot, and only this long.
    "body_timeout_s": "30",
    "timeout_s": "300",
    "retry_after_s": "1",
    # Requests a minute per API key (per client address where there are no keys); 0: no such limit.
    "rate_per_minute": "0",
}


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


@dataclass(frozen=True)
class GatewaySettings:
    """What one gateway serves with; `cli.settings_from_args` makes one from the flags."""

    triton_url: str = DEFAULTS["triton_url"]
    model: str = DEFAULTS["model"]
    max_body_bytes: int = parse_bytes(DEFAULTS["max_body_bytes"])
    max_concurrency: int = int(DEFAULTS["max_concurrency"])
    max_queue: int = int(DEFAULTS["max_queue"])
    queue_timeout_s: float = float(DEFAULTS["queue_timeout_s"])
    body_timeout_s: float = float(DEFAULTS["body_timeout_s"])
    timeout_s: float = float(DEFAULTS["timeout_s"])
    retry_after_s: int = int(DEFAULTS["retry_after_s"])
    api_key: str | None = None
    # Named keys, "name=key,name2=key2" (from FLUX2_KLEIN_API_KEYS only: secrets stay out of the process list)
    # and/or a JSON file {name: key | {"key": ..., "per_minute": N}}; see access.py.
    api_keys: str | None = None
    api_keys_file: str | None = None
    rate_per_minute: int = int(DEFAULTS["rate_per_minute"])

    def __post_init__(self):
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive; got {self.max_body_bytes}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1; got {self.max_concurrency}")
        for name in ("timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds; got {value}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0; got {self.max_queue}")
        if not (self.queue_timeout_s >= 0 and math.isfinite(self.queue_timeout_s)):
            raise ValueError(f"queue_timeout_s must be >= 0 seconds; got {self.queue_timeout_s}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0; got {self.retry_after_s}")
        if self.rate_per_minute < 0:
            raise ValueError(f"rate_per_minute must be >= 0 (0: no limit); got {self.rate_per_minute}")

    def key_store(self):
        """The named keys (access.KeyStore, FLUX2_KLEIN_API_KEY among them as "default"), or None
        when only the single key (or none) is set; LimitsError names a bad key or file."""
        if not (self.api_keys or self.api_keys_file):
            return None
        from .access import KeyStore

        return KeyStore.from_sources(file=self.api_keys_file, variable=self.api_keys, single=self.api_key)
