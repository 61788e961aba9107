"""The gateway's encoders and its own cost, against a real tritonserver on the tiny checkpoint and a real gateway
(uvicorn, in this process): the samples of one request come back as PNGs that hold Triton's arrays bit for bit,
encoded on the codecs' pool off the event loop; `flux2-klein bench --gateway URL` reports the gateway's cost per
request (end to end minus Triton's time). No mocks; the timing figures are the bench's, not asserted."""

import argparse
import base64
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

import test_gateway as gw_tests  # its helpers (not its tests: a module attribute is not collected)
from conftest import free_port
from flux2_klein.client import codecs
from flux2_klein.client.bench import add_bench_parser
from flux2_klein.client.bench.gateway import GatewayClient
from flux2_klein.client.bench.workload import BenchError
from flux2_klein.client.triton_client import Flux2KleinClient


@pytest.fixture(scope="module")
def gateway(triton_server):
    gw = gw_tests.InProcessGateway(triton_url=triton_server.grpc_url, max_concurrency=2, timeout_s=300)
    yield gw
    gw.stop()


# ------------------------------------------------------------------------------------------ without a server

def test_bench_gateway_client_says_what_is_wrong():
    with pytest.raises(BenchError, match="not an http"):
        GatewayClient("ftp://127.0.0.1:1", 5)
    client = GatewayClient(f"127.0.0.1:{free_port()}", 5)  # nothing listens there
    with pytest.raises(BenchError, match="cannot reach the gateway"):
        client.infer({"prompt": "x"})


# ------------------------------------------------------------------------------------------ with Triton

@pytest.mark.slow
def test_samples_are_tritons_arrays_bit_for_bit_encoded_on_the_pool(gateway, triton_server):
    """4 samples at the tallest of the 17 sizes: each PNG decodes to exactly the array Triton gives for its seed,
    and every encode ran on the codecs' pool, none on the event loop's thread."""
    threads = []
    real = codecs.encode

    def spy(rgb, fmt, quality=None):
        threads.append(threading.current_thread().name)
        return real(rgb, fmt, quality)

    codecs.encode = spy
    try:
        answer = gateway.infer({"prompt": "four lighthouses", "seed": 7, "samples": 4, "steps": 1,
                                "width": 672, "height": 1568})
    finally:
        codecs.encode = real
    assert answer.status == 200, answer
    artifacts = answer.json()["artifacts"]
    assert [a["seed"] for a in artifacts] == [7, 8, 9, 10]
    assert len(threads) == 4 and all(t.startswith("encode") for t in threads), threads
    with Flux2KleinClient(triton_server.grpc_url) as client:
        for artifact in artifacts:
            image = Image.open(io.BytesIO(base64.b64decode(artifact["base64"])))
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (672, 1568)
            want = client.generate("four lighthouses", seed=artifact["seed"], steps=1, width=672, height=1568)
            assert np.array_equal(np.asarray(image), want)


@pytest.mark.slow
def test_bench_reports_the_gateways_own_cost(gateway, triton_server, tmp_path):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "bench", "--url", triton_server.grpc_url, "--gateway", f"http://127.0.0.1:{gateway.port}",
        "--concurrency", "1", "--requests", "2", "--warmup", "0", "--steps", "1", "--load", "python",
        "--no-direct", "--out", str(tmp_path), "--quiet", "--timeout", "300"])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    g = report["gateway"]
    assert g["requests"] == 2 and g["format"] == "png"
    # Triton's time is the ensemble's duration for these requests: a 1-step request through the gateway
    # takes Triton about what the level's 1-step requests took it.
    (level,) = report["levels"]
    assert 0 < g["triton_ms"] < g["e2e_ms"]
    assert 0.3 * level["overhead"]["server_ms"] < g["triton_ms"] < 3 * level["overhead"]["server_ms"]
    assert g["gateway_ms"] == pytest.approx(g["e2e_ms"] - g["triton_ms"])
    assert g["local_parts"]["megapixels"] == pytest.approx(1.048576)
    assert g["local_parts"]["encode_png_ms"] > 0 and g["local_parts"]["png_bytes"] > 0
    four = g["samples4"]
    assert four["gateway_ms"] == pytest.approx(four["e2e_ms"] - four["triton_ms"])
    assert isinstance(g["goal_met"], bool)
    md = (tmp_path / "report.md").read_text()
    assert "## Gateway" in md and f"{g['gateway_ms']:,.1f} ms per request" in md
