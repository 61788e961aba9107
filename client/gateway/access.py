"""Who may call the gateway, and how often: the named API keys (`KeyStore`, compared in constant time) and
requests per minute per key, or per client address where there are no keys (`RateLimiter`, token buckets).

Transport-free; its one user is the gateway's guard (guard.py): it names the `Caller` of each request from
its key (`KeyStore.lookup`), asks `RateLimiter.acquire(caller.label, caller.per_minute)` before any work,
and answers 429 with `Retry-After: retry_after_header(admission)` when it says no. A caller is named by its
key's name, never by the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

MIN_KEY_CHARS = 16  # shorter keys are guessable; refuse them rather than serve with them


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a named API key, or without keys the client's address."""

    label: str  # "key alice", "key default", "address 127.0.0.1": for the rate limit and the log
    key: str | None = None  # the key's name, for the metrics (never an address: that would be unbounded)
    per_minute: int | None = None  # the key's own rate limit, if it has one

    @classmethod
    def of_key(cls, name: str, per_minute: int | None = None) -> Caller:
        return cls(f"key {name}", name, per_minute)

    @classmethod
    def at(cls, address: str) -> Caller:
        return cls(f"address {address}")

    def __str__(self) -> str:
        return self.label


UNKNOWN = Caller("?")  # a request the guard did not see


class LimitsError(ValueError):
    """A limit or key setting that cannot be used; the message names it and what is allowed."""


@dataclass(frozen=True)
class Admission:
    allowed: bool
    retry_after_s: float = 0.0  # when not allowed: seconds until one request's worth of budget is back


class RateLimiter:
    """Token buckets: each caller may burst `per_minute` requests, refilled at per_minute / 60 each second.
    At most `max_callers` are remembered; past that, full (idle) buckets are forgotten first, then the
    oldest - forgetting a bucket only ever gives a caller more budget, never less."""

    def __init__(self, per_minute: int, *, max_callers: int = 100_000, clock: Callable[[], float] = time.monotonic):
        if isinstance(per_minute, bool) or not isinstance(per_minute, int) or per_minute < 1:
            raise LimitsError(f"per_minute: a whole number of requests >= 1; got {per_minute!r}")
        self.per_minute, self.max_callers, self.clock = per_minute, max_callers, clock
        self._rate = per_minute / 60.0
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, who: str, per_minute: int | None = None) -> Admission:
        """Take one request from `who`'s budget (`per_minute` overrides the limit for this caller)."""
        limit = per_minute or self.per_minute
        rate = limit / 60.0
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.pop(who, (float(limit), now))
            tokens = min(float(limit), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)  # re-inserted: the dict stays in last-use order
                self._trim(now)
                return Admission(True)
            self._buckets[who] = (tokens, now)
            return Admission(False, (1.0 - tokens) / rate)

    def _trim(self, now: float) -> None:
        if len(self._buckets) <= self.max_callers:
            return
        full = [w for w, (t, at) in self._buckets.items() if t + (now - at) * self._rate >= self.per_minute]
        for w in full[: len(self._buckets) - self.max_callers]:
            del self._buckets[w]
        while len(self._buckets) > self.max_callers:
            del self._buckets[next(iter(self._buckets))]


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes  # SHA-256 of the key: the key itself is not kept
    per_minute: int | None = None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class KeyStore:
    """Named API keys. `name_of(token)` compares the token with every key (SHA-256 digests, so all the
    same length, with hmac.compare_digest, never stopping at the first match): its time does not depend
    on which key, or how much of one, matched."""

    def __init__(self, keys: Mapping[str, str | Mapping]):
        self.keys: list[ApiKey] = []
        seen: dict[bytes, str] = {}
        for name, value in keys.items():
            spec = value if isinstance(value, Mapping) else {"key": value}
            key, per_minute = spec.get("key"), spec.get("per_minute")
            if not isinstance(name, str) or not name.strip() or any(c in name for c in ",=\n"):
                raise LimitsError(f"API key names: a non-empty name without ',', '=' or newlines; got {name!r}")
            if not isinstance(key, str) or len(key) < MIN_KEY_CHARS:
                raise LimitsError(f"API key {name!r}: at least {MIN_KEY_CHARS} characters")
            if per_minute is not None and (isinstance(per_minute, bool) or not isinstance(per_minute, int)
                                           or per_minute < 1):
                raise LimitsError(f"API key {name!r}: per_minute is a whole number >= 1; got {per_minute!r}")
            unknown = sorted(set(spec) - {"key", "per_minute"})
            if unknown:
                raise LimitsError(f"API key {name!r}: unknown field(s) {unknown}; allowed: ['key', 'per_minute']")
            d = _digest(key)
            if d in seen:
                raise LimitsError(f"API keys {seen[d]!r} and {name!r} are the same key")
            seen[d] = name
            self.keys.append(ApiKey(name, d, per_minute))

    def __bool__(self) -> bool:
        return bool(self.keys)

    def lookup(self, token: str) -> ApiKey | None:
        d = _digest(token)
        found = None
        for k in self.keys:
            if hmac.compare_digest(d, k.digest):
                found = k
        return found

    def name_of(self, token: str) -> str | None:
        k = self.lookup(token)
        return k.name if k else None

    @classmethod
    def from_sources(cls, *, file: str | Path | None = None, variable: str | None = None,
                     single: str | None = None) -> KeyStore:
        """Keys from a JSON file ({name: key} or {name: {"key": ..., "per_minute": N}}), a variable
        ("name=key,name2=key2"), and the single unnamed key of FLUX2_KLEIN_API_KEY (named "default")."""
        keys: dict[str, str | Mapping] = {}
        if file:
            try:
                data = json.loads(Path(file).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise LimitsError(f"API keys file {file}: {e}") from None
            if not isinstance(data, dict):
                raise LimitsError(f"API keys file {file}: expected an object of name -> key")
            keys.update(data)
        for item in filter(None, (x.strip() for x in (variable or "").split(","))):
            name, sep, key = item.partition("=")
            if not sep:
                raise LimitsError("API keys variable: comma-separated name=key pairs; an item has no '='")
            keys[name.strip()] = key.strip()
        if single:
            keys.setdefault("default", single)
        return cls(keys)


def retry_after_header(admission: Admission) -> str:
    """The Retry-After value (whole seconds, at least 1) of a refused request."""
    return str(max(1, math.ceil(admission.retry_after_s)))
