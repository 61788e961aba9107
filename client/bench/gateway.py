"""The HTTP gateway's own cost per request (`bench --gateway URL`): requests one after another through
`POST /v1/infer`, their end-to-end time at the client minus Triton's time for them (the ensemble's request
duration from Triton's statistics, receipt to response). What is left is the gateway's work: the HTTP exchange,
JSON, the API key, the body, base64 references, the Triton call's transport (the image's gRPC transfer),
encoding the image, base64 and the response. The parts done with the image are timed again here, with the same
code, on the image the gateway answered: an estimate (this host, not necessarily the gateway's)."""

from __future__ import annotations

import base64
import http.client
import json
import os
import statistics
import time
import urllib.parse
from typing import Any

from flux2_klein.contract import MODEL_NAME as MODEL

from .stats import delta, settled_snapshot
from .workload import BenchConfig, BenchError, Entry

GATEWAY_GOAL_MS = 15.0  # per 1 MP PNG image at concurrency 1, beyond Triton's own time (issue 21)
KEY_VARIABLE = "FLUX2_KLEIN_API_KEY"  # the gateway's own variable: a keyed gateway's key, read from here
DEFINITION = ("gateway cost = the mean end-to-end time of a request through the gateway at concurrency 1 minus "
              "Triton's time for it (the ensemble's request duration, Triton's statistics): HTTP, JSON, key, body, "
              "references, the Triton call's transport, encoding, base64, response")


class GatewayClient:
    """One keep-alive HTTP connection to the gateway."""

    def __init__(self, url: str, timeout_s: float | None):
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BenchError(f"--gateway: {url!r} is not an http(s)://HOST:PORT URL")
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.url = url
        self.connection = kind(parts.hostname, parts.port, timeout=timeout_s or 600)
        self.headers = {"Content-Type": "application/json"}
        if os.environ.get(KEY_VARIABLE):
            self.headers["Authorization"] = f"Bearer {os.environ[KEY_VARIABLE]}"

    def infer(self, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """(seconds, the answer's JSON) of one POST /v1/infer."""
        payload = json.dumps(body).encode()
        start = time.perf_counter()
        try:
            self.connection.request("POST", "/v1/infer", payload, self.headers)
            response = self.connection.getresponse()
            data = response.read()
        except OSError as e:
            raise BenchError(f"cannot reach the gateway at {self.url}: {e}") from None
        seconds = time.perf_counter() - start
        if response.status != 200:
            raise BenchError(f"the gateway at {self.url} answered {response.status}: {data[:300]!r}" + (
                f" (set {KEY_VARIABLE} for a gateway with a key)" if response.status == 401 else ""))
        return seconds, json.loads(data)

    def close(self) -> None:
        self.connection.close()


def _body(entry: Entry, samples: int = 1) -> dict[str, Any]:
    body = {"prompt": entry.prompt, "width": entry.width, "height": entry.height,
            "seed": entry.seed + 1,  # NIM's seed 0 is a random one
            "samples": samples, "output_format": "png"}
    if entry.steps is not None:
        body["steps"] = entry.steps
    if entry.references:
        body["image"] = [base64.b64encode(r).decode("ascii") for r in entry.references]
    return body


def _timed_ms(fn, repeat: int = 5) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def _local_parts(answer: dict[str, Any]) -> dict[str, float]:
    """What the gateway does with one answered image, timed here with its code: encode, then the answer's body
    (base64 and JSON, written together by images_json)."""
    from .. import codecs
    from ..gateway.responses import Base64, images_json

    artifact = answer["artifacts"][0]
    data = base64.b64decode(artifact["base64"])
    image = codecs.decode(data)
    body = {"artifacts": [{**artifact, "base64": Base64(data)}]}
    return {"encode_png_ms": _timed_ms(lambda: codecs.encode(image, "png")),
            "body_ms": _timed_ms(lambda: images_json(body)), "png_bytes": len(data),
            "megapixels": image.shape[0] * image.shape[1] / 1e6}


def _measure(gw: GatewayClient, triton, bodies: list[dict[str, Any]]) -> tuple[list[float], float, int, dict]:
    """(seconds per request, Triton's mean ms per Triton request, Triton requests seen, the last answer)."""
    before = settled_snapshot(triton)
    ens = before.get(MODEL, {})
    expected = sum(b["samples"] for b in bodies)
    times, answer = [], {}
    for body in bodies:
        seconds, answer = gw.infer(body)
        times.append(seconds)
    d = delta(before, settled_snapshot(triton, ens.get("success_count", 0) + ens.get("fail_count", 0) + expected))
    seen = d.get(MODEL, {}).get("success_count", 0)
    if seen < expected:
        raise BenchError(f"Triton at the bench's --url saw {seen} of the {expected} requests sent through the gateway "
                         f"at {gw.url}: the gateway must serve the Triton that --url names, with nothing else loading it")
    return times, d[MODEL]["success_ns"] / seen / 1e6, seen, answer


def gateway_cost(cfg: BenchConfig, triton, entries: list[Entry], progress) -> dict[str, Any]:
    """Warm-up, `entries` one at a time (1 sample each), then one request of 4 samples; the report's "gateway"."""
    gw = GatewayClient(cfg.gateway, cfg.timeout_s)
    try:
        progress.update(f"bench: gateway {cfg.gateway}: warm-up")
        gw.infer(_body(entries[0]))
        progress.update(f"bench: gateway {cfg.gateway}: {len(entries) - 1} requests, one at a time")
        times, triton_ms, _, answer = _measure(gw, triton, [_body(e) for e in entries[1:]])
        progress.update(f"bench: gateway {cfg.gateway}: one request of 4 samples")
        four = {**_body(entries[0], samples=4), "prompt": entries[0].prompt + " (4 samples)"}
        times4, triton4_ms, _, _ = _measure(gw, triton, [four])
    finally:
        gw.close()
        progress.done()
    e2e_ms = statistics.mean(times) * 1e3
    one = e2e_ms - triton_ms
    four_ms = times4[0] * 1e3 - triton4_ms
    parts = _local_parts(answer)
    return {
        "url": cfg.gateway, "requests": len(times), "format": "png", "definition": DEFINITION,
        "e2e_ms": e2e_ms, "e2e_p50_ms": statistics.median(times) * 1e3, "triton_ms": triton_ms,
        "gateway_ms": one, "gateway_ms_per_megapixel": one / parts["megapixels"],
        "samples4": {"e2e_ms": times4[0] * 1e3, "triton_ms": triton4_ms, "gateway_ms": four_ms,
                     "ratio_to_one": four_ms / one if one > 0 else float("nan")},
        "local_parts": parts, "goal_ms": GATEWAY_GOAL_MS,
        "goal_met": one / parts["megapixels"] <= GATEWAY_GOAL_MS,
    }


def markdown_lines(gw: dict[str, Any] | None) -> list[str]:
    """The report's "Gateway" section, or nothing when the run had no --gateway."""
    if not gw:
        return []
    p, four = gw["local_parts"], gw["samples4"]
    return [
        "## Gateway", "", f"- {gw['definition']}.",
        f"- {gw['url']}, {gw['requests']} PNG requests of 1 image one after another: end to end "
        f"{gw['e2e_ms']:,.1f} ms (p50 {gw['e2e_p50_ms']:,.1f}) - Triton {gw['triton_ms']:,.1f} ms = "
        f"**{gw['gateway_ms']:,.1f} ms per request** ({gw['gateway_ms_per_megapixel']:,.1f} ms per megapixel)",
        f"- of which, timed again on this host with the gateway's code on its answer ({p['megapixels']:.2f} MP, "
        f"{p['png_bytes'] / 1e6:.2f} MB PNG): encoding {p['encode_png_ms']:,.1f} ms, the answer's body (base64 and "
        f"JSON) {p['body_ms']:,.1f} ms; the rest is HTTP, parsing, the image's gRPC transfer and, on a busy host, "
        "waiting for a core at each hand-off between the event loop and the encoding pool",
        f"- one request of 4 samples: end to end {four['e2e_ms']:,.1f} ms - Triton {four['triton_ms']:,.1f} ms "
        f"= at most {four['gateway_ms']:,.1f} ms, {four['ratio_to_one']:.2f}x one sample's. An upper bound: Triton's "
        "statistics give the mean duration of the request's 4 Triton requests, and the request waits for the "
        "last of them (on a GPU, where they share one batched loop, nearly the same; on a CPU, not)",
        f"- goal, at most {gw['goal_ms']:g} ms per 1 MP PNG beyond Triton's time: "
        f"**{'met' if gw['goal_met'] else 'NOT met'}**", "",
    ]
