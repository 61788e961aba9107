"""A newcomer's first hour (issue 15): `generate` right after `serve &` waits for readiness instead of
failing; the bench report states one overhead, warns about small samples and explains each verdict;
the demo's contact sheet labels what changed. Real tritonserver, real tritonclient, loopback only."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from flux2_klein.client import Flux2KleinClient, GenerationError
from flux2_klein.client.bench.report import markdown
from flux2_klein.client.bench.stats import MODELS, OVERHEAD_DEFINITION, compare, model_table, overhead
from flux2_klein.contract import MODEL_NAME
from flux2_klein.server import free_port

CLI = [sys.executable, "-m", "flux2_klein.cli"]


def test_waiting_for_a_server_that_never_comes_says_why_and_gives_up_on_time():
    url = f"127.0.0.1:{free_port()}"
    said = []
    with Flux2KleinClient(url) as client:
        start = time.monotonic()
        with pytest.raises(GenerationError) as e:
            client.wait_until_ready(2.0, on_wait=lambda waited, why: said.append((waited, why)), report_every_s=0.5)
        waited = time.monotonic() - start
    assert 2.0 <= waited < 6.0
    assert e.value.status == "UNAVAILABLE" and "not ready after waiting 2 s" in e.value.message
    assert url in e.value.message and "cannot reach" in e.value.message
    assert len(said) >= 2 and all(url in why for _, why in said)
    assert [w for w, _ in said] == sorted(w for w, _ in said)


def test_wait_s_must_be_a_duration():
    with pytest.raises(ValueError, match="wait_s must be 0 or a positive number of seconds"):
        Flux2KleinClient("127.0.0.1:1", wait_s=-1)


@pytest.mark.slow
def test_generate_pasted_right_after_serve_waits_for_it_and_writes_the_image(triton_repo, tmp_path):
    """The README's step-by-step block: `serve ... &` then `generate` at once."""
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(CLI + ["serve", "--repository", str(triton_repo), "--http-port", str(http),
                                    "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        out = tmp_path / "lighthouse.png"
        gen = subprocess.Popen(CLI + ["generate", "--prompt", "a lighthouse at dusk", "--seed", "42", "--size",
                                      "1024x1024", "--url", f"127.0.0.1:{grpc}", "--wait", "300", "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while gen.poll() is None and serve.poll() is None:
            time.sleep(1)
        if gen.poll() is None:  # serve died: generate would wait its full time for nothing
            gen.kill()
            errors = [line for line in (tmp_path / "serve.log").read_text().splitlines()
                      if line.startswith("E") or "error" in line.lower()]
            pytest.fail("serve exited while generate waited:\n" + "\n".join(errors[-20:]))
        stdout, stderr = gen.communicate(timeout=600)
        assert gen.returncode == 0, stderr + (tmp_path / "serve.log").read_text()[-3000:]
        assert "waiting for Triton" in stderr  # Triton takes tens of seconds to load; we said so meanwhile
        assert stdout.startswith(str(out)) and Image.open(out).size == (1024, 1024)
    finally:
        serve.terminate()
        serve.wait(60)
        log.close()


def _level(concurrency: int, requests: int, e2e_ms: float) -> dict:
    ms = 1_000_000
    d = {
        MODEL_NAME: {"success_count": requests, "success_ns": int(0.9 * e2e_ms * ms * requests)},
        "preprocess": {"success_count": requests, "compute_infer_ns": 10 * ms * requests},
        "text_encoder": {"success_count": requests, "compute_infer_ns": 50 * ms * requests},
        "sampler": {"success_count": requests, "compute_infer_ns": 700 * ms * requests},
        "transformer": {"success_count": 4 * requests, "compute_infer_ns": 600 * ms * requests,
                        "success_ns": 620 * ms * requests},
        "vae_decoder": {"success_count": requests, "compute_infer_ns": 100 * ms * requests},
    }
    level = {"concurrency": concurrency, "requests": requests, "throughput": concurrency * 1000 / e2e_ms,
             "latency_ms": {"avg": e2e_ms, "p50": e2e_ms * 1.01, "p90": e2e_ms * 1.02, "p99": e2e_ms * 1.02},
             "models": model_table(d)}
    level["overhead"] = overhead(level)
    return level


def test_the_bench_report_has_one_overhead_sample_warnings_and_reasons_under_each_verdict():
    levels = [_level(1, 2, 1000.0), _level(2, 40, 1900.0)]
    direct = {"requests": 2, "threads": 2, "latency_ms": {"avg": 980.0, "p50": 981.0},
              "stage_ms": {"transformer": 600.0}, "throughput_by_n": {"1": 1.02, "2": 1.02}, "throughput": 1.02}
    report = {
        "setup": {"model": MODEL_NAME, "url": "127.0.0.1:1", "protocol": "grpc", "date": "today", "server": "triton",
                  "host": {"cpus": 2, "machine": "x86_64"}, "load": "tritonclient threads", "perf_analyzer": {},
                  "sizes": ["1024x1024"], "references": 0, "reference_size": "1024x1024", "steps": 4,
                  "measurement": "fixed request count", "requests": 2, "warmup": 1, "instances": {}},
        "levels": levels, "direct": direct, "comparison": compare(levels, direct),
    }
    md = markdown(report)
    assert md.count(OVERHEAD_DEFINITION) == 1 and "(a)" not in md and "(b)" not in md
    assert "Triton - direct 20.00 ms" in md and "overhead 20.00" not in md  # the other figure has its own name
    assert "Sample size, concurrency 1:** only 2 request(s)" in md and "Sample size, concurrency 2" not in md
    assert "sample size, direct: only 2 request(s)" in md
    goals = report["comparison"]["goals"]
    assert set(goals) == set(report["comparison"]["goal_explanations"])
    for name, met in goals.items():
        verdict = f"- **{name}: {'met' if met else 'NOT met'}**"
        assert verdict in md
        explanation = md.split(verdict, 1)[1].split("\n- ", 1)[0]
        assert "measured" in explanation or "Triton" in explanation, name
    assert "measured 240.00 ms at concurrency 1 against 10 ms" in md
    assert "the largest part is transport and the ensemble's hand-offs (160.00 ms)" in md
    assert set(MODELS) <= set(levels[0]["models"])


def test_the_contact_sheet_labels_each_request_with_what_changed(tmp_path):
    from flux2_klein.demo import THUMB, contact_sheet, reference_picture, requests

    reference = reference_picture(tmp_path / "reference.png")
    rng = np.random.default_rng(0)
    results = [(req, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for req in requests(reference)]
    sheet = Image.open(contact_sheet(results, reference, tmp_path / "sheet.png"))
    assert sheet.width == THUMB * (len(results) + 1)  # the reference, then each request
    assert [r.changed for r, _ in results] == ["", "seed", "prompt", "reference"]
    tiles = np.asarray(sheet.convert("RGB"))
    # Each picture lands in its own column: the columns differ as the images do.
    columns = [tiles[60:60 + THUMB // 2, i * THUMB:(i + 1) * THUMB].astype(int) for i in range(len(results) + 1)]
    assert all(np.abs(columns[i] - columns[i + 1]).mean() > 10 for i in range(len(columns) - 1))
