"""The NIM-style HTTP gateway (`flux2-klein gateway`, client/gateway/, CONTRACT.md section 4) against a real
tritonserver on the tiny checkpoint: the gateway runs in this process (uvicorn in a thread) or as the real
command in a subprocess, and every request goes over real HTTP and real gRPC. No mocks.

Image requests are few (each is seconds on a CPU); error cases are cheap and many."""

import argparse
import base64
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from flux2_klein.client.gateway import ENV, GatewaySettings, add_gateway_parser
from flux2_klein.client.gateway.app import create_app
from flux2_klein.client.triton_client import Flux2KleinClient

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------

class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, {k.lower(): v for k, v in headers.items()}, body

    def json(self):
        return json.loads(self.body)

    @property
    def detail(self) -> str:
        return self.json()["detail"]

    def __repr__(self):
        return f"Answer({self.status}, {self.body[:300]!r})"


def http_request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 120) -> Answer:
    """One request on a fresh connection. body: bytes, a JSON-able dict/list, or an iterable of chunks
    (sent chunked, without Content-Length)."""
    headers = dict(headers or {})
    chunked = False
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    elif body is not None and not isinstance(body, (bytes, str)):
        chunked = True
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            conn.request(method, path, body=body, headers=headers, encode_chunked=chunked)
        except (BrokenPipeError, ConnectionResetError):
            # The gateway may answer (413, 408) and close before a large upload is all sent, as a server
            # should; its answer is already on the way back, so read it.
            pass
        response = conn.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


class InProcessGateway:
    """create_app(settings) served by uvicorn in a thread, on a free port."""

    def __init__(self, **settings):
        import uvicorn

        self.port = free_port()
        self.app = create_app(GatewaySettings(**settings))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)

    def request(self, method, path, body=None, headers=None, timeout: float = 120) -> Answer:
        return http_request(self.port, method, path, body, headers, timeout)

    def infer(self, payload, headers=None, timeout: float = 120) -> Answer:
        return self.request("POST", "/v1/infer", payload, headers, timeout)

    def metrics(self) -> str:
        answer = self.request("GET", "/v1/metrics")
        assert answer.status == 200, answer
        return answer.body.decode()

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(m.group(3))
    return 0.0


def decode(answer: Answer, fmt: str) -> tuple[np.ndarray, dict]:
    assert answer.status == 200, answer
    body = answer.json()
    assert list(body) == ["artifacts"] and len(body["artifacts"]) == 1
    artifact = body["artifacts"][0]
    assert artifact["finishReason"] == "SUCCESS"
    data = base64.b64decode(artifact["base64"], validate=True)
    image = Image.open(io.BytesIO(data))
    assert image.format == fmt and image.mode == "RGB"
    return np.asarray(image), {**artifact, "bytes": data}


def pattern(width: int, height: int, kind: int) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    channels = [(xx * 255 // width), (yy * 255 // height), ((xx // 16 + yy // 16) % 2) * 200]
    return Image.fromarray(np.stack(channels[kind:] + channels[:kind], -1).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gateway(triton_server):
    """The gateway most tests share: no API key, and one request in flight at a time, so that the 429 test
    needs only one slow request."""
    gw = InProcessGateway(triton_url=triton_server.grpc_url, max_concurrency=1, max_queue=0, timeout_s=300)
    yield gw
    gw.stop()


@pytest.fixture
def make_gateway():
    made = []

    def make(**settings):
        made.append(InProcessGateway(**settings))
        return made[-1]

    yield make
    for gw in made:
        gw.stop()


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------

def test_text_to_image_equals_the_client_and_429_while_full(gateway, triton_server):
    """A request without a seed gets a random one, returned in the artifact; its PNG holds exactly the pixels
    Flux2KleinClient.generate gives for that seed. While it is in flight (limit 1), a second request gets 429."""
    prompt = "a lighthouse at dusk, gateway"
    before = gateway.metrics()
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("answer", gateway.infer({"prompt": prompt, "steps": 2})))
    worker.start()
    deadline = time.monotonic() + 30
    while metric(gateway.metrics(), "flux2_klein_gateway_in_flight") < 1:
        assert worker.is_alive() and time.monotonic() < deadline, f"the first request never was in flight: {box}"
        time.sleep(0.02)
    busy = gateway.infer({"prompt": "a second one", "steps": 2})
    worker.join(120)
    assert busy.status == 429, busy
    assert busy.headers["retry-after"] == "1"
    assert "at most 1" in busy.detail and "max-concurrency" in busy.detail

    got, artifact = decode(box["answer"], "PNG")
    seed = artifact["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    with Flux2KleinClient(triton_server.grpc_url) as client:
        want = client.generate(prompt, seed=seed, steps=2)
    assert got.shape == (1024, 1024, 3)
    assert np.array_equal(got, want)

    after = gateway.metrics()
    for status in ("200", "429"):
        counted = metric(after, "flux2_klein_gateway_requests_total", path="/v1/infer", method="POST", status=status)
        assert counted == metric(before, "flux2_klein_gateway_requests_total", path="/v1/infer", method="POST",
                                 status=status) + 1
    assert metric(after, "flux2_klein_gateway_errors_total", path="/v1/infer", reason="busy") >= 1
    assert metric(after, "flux2_klein_gateway_request_duration_seconds_count", path="/v1/infer") >= 2
    assert metric(after, "flux2_klein_gateway_in_flight") == 0
    assert metric(after, "flux2_klein_gateway_max_concurrency") == 1


def test_samples_use_seed_plus_i_and_seed_0_is_random(gateway, triton_server):
    """NIM's seed 0 means random: the seeds used come back, image i with seed + i, each exactly the single
    request with its seed."""
    answer = gateway.infer({"prompt": "two foxes", "seed": 0, "samples": 2, "steps": 1})
    assert answer.status == 200, answer
    artifacts = answer.json()["artifacts"]
    assert len(artifacts) == 2 and all(a["finishReason"] == "SUCCESS" for a in artifacts)
    first = artifacts[0]["seed"]
    assert 0 < first < 2**32 and artifacts[1]["seed"] == first + 1
    with Flux2KleinClient(triton_server.grpc_url) as client:
        for artifact in artifacts:
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(artifact["base64"]))))
            assert np.array_equal(got, client.generate("two foxes", seed=artifact["seed"], steps=1))
    again = gateway.infer({"prompt": "two foxes", "steps": 1, "mode": "base", "disable_safety_checker": True})
    assert again.status == 200 and again.json()["artifacts"][0]["seed"] not in (0, first), again


def test_editing_with_a_base64_and_a_data_url_image_as_jpeg(gateway, triton_server):
    """Two references, one plain base64 (a JPEG), one data URL (a PNG); JPEG out. The JPEG is byte for byte what
    Pillow makes of the client's image at the documented quality (95), so the pixels under it are the same."""
    refs = [encoded(pattern(320, 256, 0), "JPEG", quality=90), encoded(pattern(200, 300, 1), "PNG")]
    payload = {"prompt": "make it winter", "seed": 11, "steps": 2, "width": 1248, "height": 832,
               "image": [b64(refs[0]), "data:image/png;base64," + b64(refs[1])], "output_format": "jpeg"}
    got, artifact = decode(gateway.infer(payload), "JPEG")
    assert artifact["seed"] == 11 and got.shape == (832, 1248, 3)
    with Flux2KleinClient(triton_server.grpc_url) as client:
        want = client.generate("make it winter", seed=11, steps=2, width=1248, height=832, references=refs)
    assert artifact["bytes"] == encoded(Image.fromarray(want), "JPEG", quality=95)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: 4xx with a message naming the field
# ---------------------------------------------------------------------------------------------------------------

TINY_PNG = encoded(pattern(16, 16, 0), "PNG")
BAD = [  # body -> status, what the detail must contain
    (b"", 400, ["body is empty"]),
    (b"{\"prompt\": ", 400, ["not valid JSON"]),
    (b"\xff\xfe{}", 400, ["not UTF-8"]),
    (b'{"prompt": "x", "cfg_scale": NaN}', 400, ["NaN"]),
    (b"[1, 2]", 422, ["JSON object", "array"]),
    (b'{"prompt": "\\ud800 lone"}', 422, ["prompt:", "surrogate"]),
    ({}, 422, ["prompt: required"]),
    ({"prompt": 5}, 422, ["prompt:", "string"]),
    ({"prompt": "x", "width": "big"}, 422, ["width:", "integer", '"big"']),
    ({"prompt": "x", "width": 1024.0}, 422, ["width:", "integer"]),
    ({"prompt": "x", "seed": True}, 422, ["seed:", "integer"]),
    ({"prompt": "x", "seed": 2**63}, 422, ["seed:", "9223372036854775807"]),
    ({"prompt": "x", "steps": 0}, 422, ["steps:", "greater than or equal to 1"]),
    ({"prompt": "x", "steps": 101}, 422, ["steps:", "less than or equal to 100"]),
    ({"prompt": "x", "cfg_scale": -1}, 422, ["cfg_scale:", "greater than or equal to 0"]),
    ({"prompt": "x", "cfg_scale": "high"}, 422, ["cfg_scale:", "number"]),
    ({"prompt": "x", "sede": 1}, 422, ["sede: unknown field", "allowed fields", "seed"]),
    ({"prompt": "x", "samples": 5}, 422, ["samples:", "less than or equal to 4"]),
    ({"prompt": "x", "samples": 0}, 422, ["samples:", "greater than or equal to 1"]),
    ({"prompt": "x", "seed": -1}, 422, ["seed:", "greater than or equal to 0"]),
    ({"prompt": "x", "seed": 2**63 - 2, "samples": 3}, 422, ["seed: with samples=3", "9223372036854775805"]),
    ({"prompt": "x", "mode": "canny"}, 422, ["mode:", "'base'"]),
    ({"prompt": "x", "disable_safety_checker": "yes"}, 422, ["disable_safety_checker:", "boolean"]),
    ({"prompt": "x", "output_format": "gif"}, 422, ["output_format:", "'png'"]),
    ({"prompt": "x", "width": 1000, "height": 1000}, 422, ["width/height: 1000x1000", "1024x1024"]),
    ({"prompt": "x", "width": 672}, 422, ["width/height: 672x1024", "672x1568"]),
    ({"prompt": "x", "image": [b64(TINY_PNG)] * 5}, 422, ["image:", "at most 4", "got 5"]),
    ({"prompt": "x", "image": 7}, 422, ["image:", "list"]),
    ({"prompt": "x", "image": [7]}, 422, ["image[0]:", "string"]),
    ({"prompt": "x", "image": ["", b64(TINY_PNG)]}, 422, ["image[0]: empty"]),
    ({"prompt": "x", "image": ["not base64!"]}, 422, ["image[0]: not valid base64"]),
    ({"prompt": "x", "image": ["QUJDR"]}, 422, ["image[0]: not valid base64"]),
    ({"prompt": "x", "image": ["https://example.com/a.png"]}, 422, ["image[0]: not valid base64"]),
    ({"prompt": "x", "image": ["data:text/plain;base64,aGVsbG8="]}, 422, ["image[0]: data URL of type 'text/plain'"]),
    ({"prompt": "x", "image": ["data:image/png,rawbytes"]}, 422, ["image[0]: only base64 data URLs"]),
    # Judged by Triton (INVALID_ARGUMENT), its input names translated to ours.
    ({"prompt": "x", "image": [b64(TINY_PNG), b64(b"not an image")]}, 422,
     ["image[0]: 16x16 is too small", "64 pixels"]),
    ({"prompt": "x", "image": [b64(encoded(pattern(128, 128, 2), "PNG")), b64(b"not an image")]}, 422,
     ["image[1]: not a decodable PNG, JPEG or WebP image"]),
]


@pytest.mark.parametrize("body,status,says", BAD, ids=[f"{i}-{s}" for i, (_, s, _) in enumerate(BAD)])
def test_bad_input_is_4xx_naming_the_field(gateway, body, status, says):
    answer = gateway.infer(body, timeout=60)
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json"
    detail = answer.detail
    for text in says:
        assert text in detail, f"{text!r} not in {detail!r}"
    assert "Traceback" not in detail and "reference_images" not in detail


def test_any_content_type_is_read_as_json_and_errors_carry_a_request_id(gateway):
    answer = gateway.infer(b'{"prompt": "x", "width": 7}', headers={"Content-Type": "text/plain"})
    assert answer.status == 422 and answer.detail.startswith("width/height: 7x1024"), answer
    assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["x-request-id"])
    mine = gateway.infer({"prompt": "x", "width": 7}, headers={"X-Request-ID": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"


def test_body_size_limit_is_413_with_or_without_content_length(make_gateway, triton_server):
    gw = make_gateway(triton_url=triton_server.grpc_url, max_body_bytes=100_000)
    big = json.dumps({"prompt": "x", "image": [b64(os.urandom(90_000))]}).encode()
    for answer in (gw.infer(big), gw.infer(iter([big[i:i + 8192] for i in range(0, len(big), 8192)]))):
        assert answer.status == 413, answer
        assert "more than 100000 bytes" in answer.detail and ENV["max_body_bytes"] in answer.detail
    # Just under the limit passes the size check (and fails later, on content).
    fits = gw.infer({"prompt": "x", "width": 3})
    assert fits.status == 422, fits
    text = gw.metrics()
    assert metric(text, "flux2_klein_gateway_requests_total", path="/v1/infer", method="POST", status="413") == 2
    assert metric(text, "flux2_klein_gateway_errors_total", path="/v1/infer", reason="body_too_large") == 2
    assert metric(text, "flux2_klein_gateway_errors_total", path="/v1/infer", reason="invalid_argument") == 1


# ---------------------------------------------------------------------------------------------------------------
# Auth, health, models, metrics, OpenAPI
# ---------------------------------------------------------------------------------------------------------------

def test_api_key_guards_everything_but_health_and_docs(make_gateway, triton_server):
    gw = make_gateway(triton_url=triton_server.grpc_url, api_key="s3cret-key")
    good = {"Authorization": "Bearer s3cret-key"}
    for path in ("/v1/models", "/v1/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
            answer = gw.request("GET", path, headers=headers)
            assert answer.status == 401, (path, headers, answer)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            assert "Authorization: Bearer" in answer.detail
        assert gw.request("GET", path, headers=good).status == 200
    assert gw.infer({"prompt": "x"}).status == 401
    assert gw.infer({"prompt": "x"}, headers={"Authorization": "Bearer s3cret-key2"}).status == 401
    # The right key gets past the gate: this bad request is judged on its content.
    answer = gw.infer({"prompt": "x", "steps": 0}, headers={"authorization": "bearer s3cret-key"})
    assert answer.status == 422 and answer.detail.startswith("steps:"), answer
    for path in ("/v1/health/live", "/v1/health/ready", "/openapi.json"):
        assert gw.request("GET", path).status == 200, path
    text = gw.request("GET", "/v1/metrics", headers=good).body.decode()
    assert metric(text, "flux2_klein_gateway_errors_total", path="/v1/models", reason="unauthorized") == 3


def test_no_api_key_means_open(gateway):
    assert gateway.request("GET", "/v1/models", headers={"Authorization": "Bearer anything"}).status == 200
    assert gateway.request("GET", "/v1/metrics").status == 200


def test_models_lists_flux2_klein(gateway):
    answer = gateway.request("GET", "/v1/models")
    assert answer.status == 200
    body = answer.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["flux2_klein"]
    assert body["data"][0]["object"] == "model"


def test_openapi_describes_the_api(gateway):
    spec = gateway.request("GET", "/openapi.json").json()
    for path in ("/v1/infer", "/v1/health/live", "/v1/health/ready", "/v1/models", "/v1/metrics"):
        assert path in spec["paths"], path
    schema = spec["paths"]["/v1/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
    assert {"prompt", "mode", "width", "height", "seed", "steps", "cfg_scale", "image", "samples",
            "disable_safety_checker", "output_format"} <= set(schema["properties"])
    assert {"200", "400", "401", "413", "422", "429", "503", "504"} <= set(spec["paths"]["/v1/infer"]["post"]["responses"])
    for path in ("/v1/images/generations", "/v1/images/edits"):
        assert path in spec["paths"], path


def test_docs_page_needs_no_cdn_and_no_key(make_gateway, triton_server):
    """/docs and every file it loads come from the gateway (the swagger-ui-bundle-v2 package), and load without
    the API key: a browser can't add it to the page's own requests."""
    gw = make_gateway(triton_url=triton_server.grpc_url, api_key="k")
    docs = gw.request("GET", "/docs")
    assert docs.status == 200 and b"SwaggerUIBundle" in docs.body
    urls = re.findall(rb'(?:src|href)="([^"]+)"', docs.body)
    assert urls and all(url.startswith(b"/") for url in urls), urls  # nothing from another host
    for url in urls:
        asset = gw.request("GET", url.decode())
        assert asset.status == 200 and len(asset.body) > 500, (url, asset)
    assert b"SwaggerUIBundle" in gw.request("GET", "/docs?asset=swagger-ui-bundle.js").body
    assert gw.request("GET", "/docs?asset=../../etc/passwd").status == 404


def test_ready_needs_triton_and_the_model(make_gateway, triton_server):
    assert make_gateway(triton_url=triton_server.grpc_url).request("GET", "/v1/health/ready").status == 200
    missing = make_gateway(triton_url=triton_server.grpc_url, model="no_such_model")
    answer = missing.request("GET", "/v1/health/ready")
    assert answer.status == 503 and "no_such_model" in answer.detail, answer
    answer = missing.infer({"prompt": "x"})
    assert answer.status == 503 and answer.headers["retry-after"] == "1", answer


class Relay:
    """A plain TCP relay from a local port to Triton's gRPC port, started on demand: to the gateway, a Triton that
    was down (nothing listening) comes up. Every byte still goes to and from the real tritonserver."""

    def __init__(self, port: int, target_port: int):
        import socket

        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", port))
        self.sockets = [self.listener]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket

        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        import socket

        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.closed = True
        for sock in self.sockets:
            sock.close()


def test_ready_is_503_until_triton_answers_then_200(make_gateway, triton_server):
    """The gateway starts first, pointing at a port where nothing listens: live 200, ready 503, /v1/infer 503.
    Once that port leads to Triton, ready turns 200 within seconds, though gRPC's reconnect backoff had grown
    meanwhile (its default would wait up to 120 s), and requests reach Triton."""
    port = free_port()
    gw = make_gateway(triton_url=f"localhost:{port}", retry_after_s=3)
    assert gw.request("GET", "/v1/health/live").status == 200
    for _ in range(3):
        down = gw.request("GET", "/v1/health/ready")
        assert down.status == 503 and f"localhost:{port}" in down.detail and down.headers["retry-after"] == "3"
        infer = gw.infer({"prompt": "x"})
        assert infer.status == 503 and infer.headers["retry-after"] == "3", infer
        assert "unavailable" in infer.detail
        time.sleep(1)  # let the reconnect backoff grow, as it does while Triton is down for long
    relay = Relay(port, triton_server.grpc_port)
    try:
        up_at = time.monotonic()
        while (answer := gw.request("GET", "/v1/health/ready")).status != 200:
            assert answer.status == 503, answer
            assert time.monotonic() - up_at < 10, f"still {answer} 10 s after Triton became reachable"
            time.sleep(0.1)
        assert gw.request("GET", "/v1/health/live").status == 200
        answer = gw.infer({"prompt": "x", "image": [b64(b"not an image")]})  # judged by Triton now
        assert answer.status == 422 and answer.detail.startswith("image[0]: not a decodable"), answer
    finally:
        relay.close()


# ---------------------------------------------------------------------------------------------------------------
# Timeout, and the command itself
# ---------------------------------------------------------------------------------------------------------------

def test_request_past_the_timeout_is_504(make_gateway, triton_server):
    gw = make_gateway(triton_url=triton_server.grpc_url, timeout_s=0.3)
    start = time.monotonic()
    answer = gw.infer({"prompt": "too slow", "steps": 1, "seed": 1})
    assert answer.status == 504, answer
    assert time.monotonic() - start < 3
    assert "no image within 0.3 s" in answer.detail and ENV["timeout_s"] in answer.detail
    assert metric(gw.metrics(), "flux2_klein_gateway_errors_total", path="/v1/infer", reason="timeout") == 1


def test_parser_reads_flags_and_environment(monkeypatch):
    def parse(argv):
        parser = argparse.ArgumentParser()
        add_gateway_parser(parser.add_subparsers(dest="command"))
        return parser.parse_args(["gateway", *argv])

    for key in ENV.values():
        monkeypatch.delenv(key, raising=False)
    args = parse([])
    assert (args.host, args.port, args.triton_url, args.model) == ("0.0.0.0", 8000, "localhost:8001", "flux2_klein")
    assert (args.max_body_bytes, args.max_concurrency, args.timeout, args.retry_after, args.api_key) == (
        64 << 20, 8, 300.0, 1, None)
    monkeypatch.setenv("FLUX2_KLEIN_GATEWAY_PORT", "9000")
    monkeypatch.setenv("FLUX2_KLEIN_GATEWAY_MAX_BODY_BYTES", "2MB")
    monkeypatch.setenv("FLUX2_KLEIN_GATEWAY_TIMEOUT_S", "1.5")
    monkeypatch.setenv("FLUX2_KLEIN_API_KEY", "k")
    args = parse(["--max-concurrency", "3"])
    assert (args.port, args.max_body_bytes, args.timeout, args.api_key, args.max_concurrency) == (
        9000, 2_000_000, 1.5, "k", 3)
    monkeypatch.setenv("FLUX2_KLEIN_GATEWAY_MAX_CONCURRENCY", "0")
    with pytest.raises(SystemExit):
        parse([])


def test_the_command_serves_until_sigterm(triton_server):
    """run_gateway for real, in a subprocess, configured through environment variables."""
    port = free_port()
    code = ("import argparse, sys; from flux2_klein.client.gateway import add_gateway_parser; "
            "p = argparse.ArgumentParser(); add_gateway_parser(p.add_subparsers()); "
            "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    env = {**os.environ, "FLUX2_KLEIN_GATEWAY_TRITON_URL": triton_server.grpc_url, "FLUX2_KLEIN_API_KEY": "k2"}
    process = subprocess.Popen([sys.executable, "-c", code, "gateway", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                answer = http_request(port, "GET", "/v1/health/ready", timeout=5)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
                time.sleep(0.1)
        assert answer.status == 200, answer
        assert http_request(port, "GET", "/v1/models").status == 401
        assert http_request(port, "GET", "/v1/models", headers={"Authorization": "Bearer k2"}).status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    # uvicorn shuts down gracefully, then lets SIGTERM end the process as it would have: status -15.
    assert process.returncode in (0, -signal.SIGTERM), out.decode()
    assert "Application shutdown complete" in out.decode()
