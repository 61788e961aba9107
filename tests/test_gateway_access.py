"""The gateway's abuse limits, without the gateway: token buckets per caller, named keys in constant time."""

from __future__ import annotations

import json

import pytest

from flux2_klein.client.gateway.access import KeyStore, LimitsError, RateLimiter, retry_after_header


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_rate_limiter_bursts_refills_and_says_when():
    clock = Clock()
    limiter = RateLimiter(3, clock=clock)
    assert [limiter.acquire("k").allowed for _ in range(4)] == [True, True, True, False]
    refused = limiter.acquire("k")
    assert not refused.allowed and refused.retry_after_s == pytest.approx(20.0)  # 60 s / 3 per minute
    assert retry_after_header(refused) == "20"
    assert limiter.acquire("other").allowed  # callers do not share a budget
    clock.t += 20.0
    assert limiter.acquire("k").allowed and not limiter.acquire("k").allowed
    clock.t += 3600
    assert [limiter.acquire("k").allowed for _ in range(4)] == [True, True, True, False]  # never above the burst
    assert limiter.acquire("vip", per_minute=10).allowed


def test_rate_limiter_forgets_idle_callers_first():
    clock = Clock()
    limiter = RateLimiter(2, max_callers=3, clock=clock)
    limiter.acquire("idle0"), limiter.acquire("idle1")
    clock.t += 120  # their buckets are full again: forgetting them changes nothing
    limiter.acquire("busy"), limiter.acquire("busy")
    limiter.acquire("new0"), limiter.acquire("new1")
    assert set(limiter._buckets) == {"busy", "new0", "new1"}
    assert not limiter.acquire("busy").allowed  # the busy caller's spent budget was kept
    with pytest.raises(LimitsError, match="per_minute: a whole number"):
        RateLimiter(0)


def test_key_store_names_keys_and_refuses_bad_ones(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"team-a": "a" * 32, "team-b": {"key": "b" * 32, "per_minute": 5}}))
    store = KeyStore.from_sources(file=path, variable="ci=" + "c" * 20, single="d" * 16)
    assert store.name_of("a" * 32) == "team-a" and store.lookup("b" * 32).per_minute == 5
    assert store.name_of("c" * 20) == "ci" and store.name_of("d" * 16) == "default"
    assert store.name_of("a" * 31) is None and store.name_of("") is None
    assert all(len(k.digest) == 32 for k in store.keys) and "a" * 32 not in repr(store.keys)
    with pytest.raises(LimitsError, match="at least 16 characters"):
        KeyStore({"short": "abc"})
    with pytest.raises(LimitsError, match="'x' and 'y' are the same key"):
        KeyStore({"x": "k" * 20, "y": "k" * 20})
    with pytest.raises(LimitsError, match="name=key pairs"):
        KeyStore.from_sources(variable="just-a-key-without-a-name")
    with pytest.raises(LimitsError, match=r"unknown field\(s\) \['rpm'\]"):
        KeyStore({"x": {"key": "k" * 20, "rpm": 3}})
    assert not KeyStore.from_sources()
