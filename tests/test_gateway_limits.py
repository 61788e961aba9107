"""The gateway's limits against hostile clients, with no Triton behind it (each answer comes before one is
needed): stalled uploads hold no concurrency slot and meet 408; a client leaving mid-upload is a quiet log
line; JSON nested 100,000 deep is 400; an oversized prompt is a 4xx naming `prompt`; the bounded queue."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest

from test_gateway import InProcessGateway, metric
from flux2_klein.client.gateway.guard import Slots
from flux2_klein.request import MAX_PROMPT_CHARS

NOWHERE = "127.0.0.1:9"  # discard port: nothing answers; none of these requests reach Triton


def _stall(port: int, length: int = 1000, sent: bytes = b"{", path: bytes = b"/v1/infer") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % length + sent)
    return s


def _reply(s: socket.socket) -> str:
    """Everything the gateway sends until it closes the connection (its 408 says Connection: close)."""
    s.settimeout(10)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data.decode()


@pytest.fixture
def gw():
    g = InProcessGateway(triton_url=NOWHERE, max_concurrency=2, max_queue=0, body_timeout_s=2)
    yield g
    g.stop()


def test_stalled_uploads_hold_no_slot_and_time_out(gw):
    stalled = [_stall(gw.port, path=path) for path in (b"/v1/infer", b"/v1/images/generations") * 2]
    try:
        time.sleep(0.3)
        answer = gw.infer({"prompt": 7})  # a complete request: answered at once, not 429
        assert answer.status == 422 and "prompt" in answer.detail, answer
        start = time.monotonic()
        # The body of a 408 may be lost on a loaded machine: the gateway closes a connection whose upload it
        # never read to the end, and the kernel then resets it, dropping what was still in flight. The
        # status line always arrives; the body, when it does, must say why (and in OpenAI's shape there).
        reply = _reply(stalled[0])
        assert reply.startswith("HTTP/1.1 408"), reply
        assert reply.endswith("\r\n\r\n") or "body-timeout" in reply, reply
        reply = _reply(stalled[1])
        assert reply.startswith("HTTP/1.1 408"), reply
        assert reply.endswith("\r\n\r\n") or '"error"' in reply, "OpenAI's error shape on /v1/images"
        assert time.monotonic() - start < 5
    finally:
        for s in stalled:
            s.close()
    assert metric(gw.metrics(), "flux2_klein_gateway_in_flight") == 0


def test_disconnect_mid_upload_is_a_quiet_log_line(gw, caplog):
    caplog.set_level(logging.INFO, logger="flux2_klein.gateway")
    s = _stall(gw.port, length=10_000, sent=b'{"prompt": "half')
    time.sleep(0.3)
    s.close()
    deadline = time.monotonic() + 5
    while "disconnected" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "disconnected before sending its whole body" in caplog.text
    assert "Traceback" not in caplog.text and "unhandled" not in caplog.text
    assert metric(gw.metrics(), "flux2_klein_gateway_requests_total", path="/v1/infer", method="POST",
                  status="500") == 0


def test_deep_json_is_400_and_a_huge_prompt_names_the_field(gw):
    deep = gw.infer(b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"})
    assert deep.status == 400 and "deeply" in deep.detail, deep
    long = gw.infer({"prompt": "a" * (MAX_PROMPT_CHARS + 1)})
    assert long.status == 422 and long.detail.startswith("prompt:") and str(MAX_PROMPT_CHARS) in long.detail, long
    openai = gw.request("POST", "/v1/images/generations", {"prompt": "a" * (MAX_PROMPT_CHARS + 1)})
    assert openai.status == 400 and str(MAX_PROMPT_CHARS) in openai.json()["error"]["message"], openai


def test_slots_queue_briefly_then_refuse():
    async def scenario():
        slots = Slots(limit=1, queue=1, wait_s=0.5)
        assert await slots.acquire()
        waiter = asyncio.create_task(slots.acquire())  # queues
        await asyncio.sleep(0.05)
        assert not await slots.acquire(), "the queue holds one: a third is refused at once"
        await slots.release()
        assert await waiter, "a freed slot goes to the one waiting"
        start = time.monotonic()
        assert not await slots.acquire()  # waits its 0.5 s, then gives up
        assert 0.4 < time.monotonic() - start < 2
        await slots.release()
        assert slots.in_use == 0 and slots.waiting == 0

    asyncio.run(scenario())


def test_preprocess_refuses_an_oversized_prompt_before_tokenizing():
    import numpy as np

    from flux2_klein.request import InvalidInput, parse_prompt

    fits = "é" * MAX_PROMPT_CHARS
    assert parse_prompt(np.array([fits.encode()], dtype=object)) == fits
    start = time.monotonic()
    for value in ("a" * (MAX_PROMPT_CHARS + 1), b"a" * (60 << 20)):  # the 60 MiB prompt took 57 s and 10 GB
        with pytest.raises(InvalidInput) as info:
            parse_prompt(np.array([value], dtype=object))
        assert info.value.field == "prompt" and str(MAX_PROMPT_CHARS) in str(info.value)
    assert time.monotonic() - start < 2


ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789ab"


def test_named_keys_each_with_its_rate_limit_and_an_audit_line_without_the_prompt(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flux2_klein.gateway")
    keys = tmp_path / "keys.json"
    keys.write_text('{"bob": {"key": "%s", "per_minute": 1}}' % BOB)
    g = InProcessGateway(triton_url=NOWHERE, api_keys=f"alice={ALICE}", api_keys_file=str(keys), rate_per_minute=2)
    try:
        auth = lambda key: {"Authorization": f"Bearer {key}"}  # noqa: E731
        assert g.infer({"prompt": 7}, auth("not-a-key-of-ours-at-all")).status == 401
        # alice: 2 a minute; bob: 1 (his own). A bad body still counts: the limit comes before any work.
        assert [g.infer({"prompt": 7}, auth(ALICE)).status for _ in range(3)] == [422, 422, 429]
        over = g.infer({"prompt": 7}, auth(BOB)), g.infer({"prompt": 7}, auth(BOB))
        assert [a.status for a in over] == [422, 429]
        assert int(over[1].headers["retry-after"]) >= 1 and "key bob" in over[1].detail
        assert "key" not in g.request("GET", "/v1/health/live").body.decode()  # open paths need no key
    finally:
        g.stop()
    g = InProcessGateway(triton_url=NOWHERE, api_keys=f"alice={ALICE}")
    try:
        answer = g.infer({"prompt": "a secret lighthouse"}, {"Authorization": f"Bearer {ALICE}"})
        assert answer.status == 503  # no Triton behind it: what matters here is the audit line
        metrics = g.request("GET", "/v1/metrics", headers={"Authorization": f"Bearer {ALICE}"}).body.decode()
        assert metric(metrics, "flux2_klein_gateway_key_requests_total", key="alice", outcome="error") == 1
    finally:
        g.stop()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit ")]
    assert "caller=key alice" in line and "prompt_sha256=" in line and "outcome=error" in line
    assert "lighthouse" not in caplog.text and ALICE not in caplog.text


def test_without_keys_the_limit_is_per_client_address():
    g = InProcessGateway(triton_url=NOWHERE, rate_per_minute=1)
    try:
        assert [g.infer({"prompt": 7}).status for _ in range(2)] == [422, 429]
        assert "address 127.0.0.1" in g.infer({"prompt": 7}).detail
    finally:
        g.stop()
