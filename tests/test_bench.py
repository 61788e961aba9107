"""`flux2-klein bench` on the tiny repository's running Triton: perf_analyzer's load at concurrency 1 and 2,
every model's statistics, the direct (no Triton) comparison and the report files; and `DirectPipeline`
giving exactly Triton's image (the same graphs, the same math)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import struct

import numpy as np
import pytest
from PIL import Image

from flux2_klein.client.bench import add_bench_parser, parse_concurrency
from flux2_klein.client.bench.stats import MODELS, model_table, overhead
from flux2_klein.client.bench.workload import Entry
from flux2_klein.client.perf_analyzer import PerfAnalyzerUnavailable, _diagnose, find_perf_analyzer
from flux2_klein.client.triton_client import Flux2KleinClient
from flux2_klein.contract import MODEL_NAME as MODEL
from flux2_klein.direct import DirectPipeline

CONCURRENCY = (1, 2)
REQUESTS = 2  # per concurrency slot: 2 requests at concurrency 1, 4 at 2
STEPS = 4  # the tiny distilled checkpoint's default


def perf_analyzer_or_reason():
    try:
        return find_perf_analyzer(), ""
    except PerfAnalyzerUnavailable as e:
        return None, str(e)


@pytest.fixture(scope="module")
def bench_run(triton_server, triton_repo, tmp_path_factory):
    """One `bench` run through its command-line parser: (report.json's content, the output folder)."""
    out = tmp_path_factory.mktemp("bench")
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "bench", "--url", triton_server.grpc_url, "--concurrency", "1:2", "--sizes", "1024x1024",
        "--requests", str(REQUESTS), "--warmup", "1", "--repository", str(triton_repo), "--out", str(out),
        "--timeout", "300",
    ])
    assert args.func(args) == 0
    return json.loads((out / "report.json").read_text()), out


# ------------------------------------------------------------------------------------- without a server


def test_concurrency_ranges_parse_like_perf_analyzer():
    assert parse_concurrency("1:8") == list(range(1, 9))
    assert parse_concurrency("1:8:2") == [1, 3, 5, 7]
    assert parse_concurrency("4") == [4]
    assert parse_concurrency("8,1,2,4") == [1, 2, 4, 8]
    for bad in ("0:2", "a", "2:1:0", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_concurrency(bad)


def test_references_go_to_perf_analyzer_as_a_serialized_bytes_tensor():
    refs = [b"\x89PNG first\x00", b"second\x00\x00"]
    data = Entry("a prompt", 1024, 1024, seed=3, references=refs).perf_analyzer_data()
    assert data["prompt"] == ["a prompt"] and data["seed"] == [3] and data["width"] == [1024]
    assert data["reference_images"]["shape"] == [2]
    raw = base64.b64decode(data["reference_images"]["b64"])
    items, i = [], 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        items.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    assert items == refs
    assert "reference_images" not in Entry("p", 1024, 1024, seed=0).perf_analyzer_data()


def test_model_table_and_overhead_from_a_known_statistics_delta():
    """Two requests of 4 steps, Triton's statistics written down by hand, every figure worked out by hand."""
    ms = 1_000_000  # ns
    d = {
        MODEL: {"success_count": 2, "success_ns": 1800 * ms, "queue_ns": 10 * ms, "compute_infer_ns": 1 * ms},
        "preprocess": {"success_count": 2, "compute_input_ns": 1 * ms, "compute_infer_ns": 18 * ms,
                       "compute_output_ns": 1 * ms, "queue_ns": 2 * ms},
        "text_encoder": {"success_count": 2, "compute_infer_ns": 100 * ms, "cache_hit_count": 1},
        "sampler": {"success_count": 2, "compute_infer_ns": 1400 * ms, "queue_ns": 6 * ms},
        "transformer": {"success_count": 8, "executions": 8, "compute_infer_ns": 1200 * ms,
                        "success_ns": 1240 * ms, "queue_ns": 4 * ms},
        "vae_decoder": {"success_count": 2, "compute_infer_ns": 200 * ms, "fail_count": 0},
    }
    table = model_table(d)
    assert set(table) == set(MODELS)
    assert table["preprocess"]["compute_ms"] == pytest.approx(10.0)  # (1 + 18 + 1) ms over 2 requests
    assert table["preprocess"]["queue_ms"] == pytest.approx(1.0)
    assert table["transformer"]["calls_per_request"] == 4 and table["transformer"]["compute_ms"] == pytest.approx(600)
    assert table["transformer"]["compute_per_call_ms"] == pytest.approx(150)  # 1200 ms over 8 calls
    assert table["transformer"]["success_ms"] == pytest.approx(620)
    assert table["text_encoder"]["cache_hits"] == 1
    assert table["vae_encoder"]["calls"] == 0 and table["vae_encoder"]["compute_per_call_ms"] == 0

    o = overhead({"latency_ms": {"avg": 1000.0}, "models": table})
    assert o["e2e_ms"] == 1000.0 and o["server_ms"] == pytest.approx(900)  # the ensemble's 1800 ms / 2
    assert o["leaf_compute_ms"] == pytest.approx(760)  # preprocess 10 + text encoder 50 + DiT 600 + decoder 100
    assert o["sampler_own_ms"] == pytest.approx(80)  # sampler 700 - DiT calls as it waited on them 620
    assert o["queue_ms"] == pytest.approx(6)  # 1 + 3 + 2; the ensemble's own queue (5) is not a model's
    assert o["overhead_ms"] == pytest.approx(240)
    assert o["other_ms"] == pytest.approx(154)  # 1000 - 760 - 80 - 6
    assert o["ratio"] == pytest.approx(1000 / 760)


def test_instance_memory_lists_only_the_given_repositorys_stubs(tmp_path):
    from flux2_klein.client.bench.memory import by_model, instance_memory

    assert instance_memory(tmp_path) == {} and by_model({}) == {}


def test_perf_analyzer_failures_say_what_to_install():
    assert "libb64-0d" in _diagnose("perf_analyzer: error while loading shared libraries: libb64.so.0d: cannot open")
    assert "nvidia-cuda-runtime-cu12" in _diagnose(
        "perf_analyzer: error while loading shared libraries: libcudart.so.12: cannot open shared object file")
    assert "glibc 2.38" in _diagnose("/lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.38' not found")


# ----------------------------------------------------------------------------------------- with a server


def test_perf_analyzer_generated_the_load(bench_run):
    pa, reason = perf_analyzer_or_reason()
    if pa is None:
        pytest.skip(f"perf_analyzer does not run here: {reason}")
    report, out = bench_run
    assert report["setup"]["load"] == f"perf_analyzer {pa.version}"
    for c in CONCURRENCY:
        assert (out / f"perf_analyzer-c{c}.csv").is_file()
        data = json.loads((out / f"input-data-c{c}.json").read_text())["data"]
        assert len(data) == REQUESTS * c and len({d["prompt"][0] for d in data}) == len(data)
    for level in report["levels"]:
        assert level["load"].startswith("perf_analyzer") and level["throughput_reported"] > 0
        assert set(level["client_ms"]) == {"send", "network_server", "recv"}
        assert all(v >= 0 for v in level["client_ms"].values())


def test_latency_and_throughput_are_sane(bench_run):
    report, _ = bench_run
    assert [lv["concurrency"] for lv in report["levels"]] == list(CONCURRENCY)
    for lv in report["levels"]:
        lat = lv["latency_ms"]
        assert lv["requests"] == REQUESTS * lv["concurrency"] and lv["failures"] == 0
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"], lat
        assert lat["avg"] > 0 and lv["throughput"] > 0 and lv["wall_s"] > 0
        # A request cannot take less than the server's work for it.
        assert lat["avg"] >= 0.9 * lv["overhead"]["leaf_compute_ms"]


def test_every_model_has_its_queue_and_compute_times(bench_run):
    report, _ = bench_run
    for lv in report["levels"]:
        models = lv["models"]
        assert set(models) == set(MODELS)
        for name in (MODEL, "preprocess", "text_encoder", "sampler", "vae_decoder"):
            assert models[name]["calls_per_request"] == 1, name
        assert models["transformer"]["calls_per_request"] == STEPS
        assert models["vae_encoder"]["calls"] == 0  # text to image: no references
        for name in (MODEL, "preprocess", "text_encoder", "sampler", "transformer", "vae_decoder"):
            assert models[name]["compute_ms"] > 0 and models[name]["queue_ms"] >= 0, name
        assert models["text_encoder"]["cache_hits"] == 0  # every prompt of a run is new
        o = lv["overhead"]
        assert math.isfinite(o["ratio"]) and o["ratio"] > 0


def test_direct_comparison_is_in_the_report(bench_run):
    report, _ = bench_run
    direct, cmp = report["direct"], report["comparison"]
    assert direct["requests"] == max(CONCURRENCY)
    assert direct["latency_ms"]["avg"] > 0 and direct["throughput"] > 0
    assert direct["stage_ms"]["vae_decoder"] > 0 and direct["stage_ms"]["transformer"] > 0
    c1 = cmp["latency_c1"]
    assert c1["triton_ms"] > 0 and c1["direct_ms"] > 0
    assert c1["ratio"] == pytest.approx(c1["triton_ms"] / c1["direct_ms"])
    assert [r["concurrency"] for r in cmp["throughput"]] == list(CONCURRENCY)
    assert all(r["triton"] > 0 and r["direct"] > 0 for r in cmp["throughput"])
    # Reported, not asserted: whether the goals are met depends on the machine.
    assert set(cmp["goals"]) == {"overhead_under_goal_vs_direct", "overhead_under_goal_vs_leaf_compute",
                                 "faster_than_direct_at_c_ge_2"}


def test_report_files_are_written(bench_run):
    report, out = bench_run
    md = (out / "report.md").read_text()
    assert "| concurrency | requests | images/s | p50 ms | p90 ms | p99 ms |" in md
    assert "## Serving overhead" in md and "Triton / direct" in md
    for name in MODELS:
        assert f"| {name} |" in md
    with Image.open(out / "report.png") as png:
        assert png.format == "PNG" and png.size[0] > 400


def test_memory_per_instance_is_in_the_report(bench_run):
    """Read from the stubs' /proc on this machine: every Python model of the repository, its instances, and
    which have torch loaded: none of the ONNX Runtime leaves (their glue is numpy only), the sampler does."""
    report, out = bench_run
    models = report["memory"]["models"]
    assert set(models) == {"preprocess", "sampler", "text_encoder", "transformer", "vae_decoder", "vae_encoder"}
    assert models["vae_decoder"]["instances"] == report["setup"]["instances"]["vae_decoder"]
    for name, m in models.items():
        assert m["peak_mb"] >= m["rss_mb"] > 20, name
    for leaf in ("text_encoder", "transformer", "vae_decoder", "vae_encoder"):
        assert models[leaf]["torch"] is False, leaf
    assert models["sampler"]["torch"] is True
    # 1024x1024 decoded: the decoder's peak is above every other leaf's.
    assert models["vae_decoder"]["peak_mb"] > max(models[n]["peak_mb"] for n in ("text_encoder", "transformer"))
    assert report["memory"]["direct_process_peak_mb"] > models["vae_decoder"]["peak_mb"] * 0.5
    md = (out / "report.md").read_text()
    assert "## Memory per model instance" in md and "| vae_decoder | " in md


def test_bench_falls_back_to_tritonclient_threads(triton_server, tmp_path):
    """What runs where perf_analyzer does not: the same report from tritonclient's own load."""
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--url", triton_server.grpc_url, "--concurrency", "1", "--requests", "1",
                              "--warmup", "0", "--load", "python", "--no-direct", "--out", str(tmp_path), "--quiet"])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    (level,) = report["levels"]
    assert report["setup"]["load"] == "tritonclient threads" and level["requests"] == 1
    assert level["latency_ms"]["avg"] > 0 and level["models"]["vae_decoder"]["compute_ms"] > 0
    assert report["direct"] == {"skipped": "--no-direct"} and "latency_c1" not in report["comparison"]
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.png").is_file()


def test_direct_pipeline_gives_exactly_tritons_image(triton_server, triton_repo):
    buf = io.BytesIO()
    yy, xx = np.mgrid[0:400, 0:600]
    Image.fromarray(np.stack([xx * 255 // 600, yy * 255 // 400, (xx // 40 + yy // 40) % 2 * 200], -1)
                    .astype(np.uint8)).save(buf, format="PNG")
    pipe = DirectPipeline(triton_repo)
    with Flux2KleinClient(triton_server.grpc_url) as client:
        for kwargs in (dict(width=1024, height=1024, seed=11),
                       dict(width=1568, height=672, seed=5, references=[buf.getvalue()]),
                       dict(width=1248, height=832, seed=3, image=buf.getvalue(), strength=0.7)):  # inpainting
            want = client.generate("a lighthouse at dusk", **kwargs)
            got = pipe.generate("a lighthouse at dusk", **kwargs)
            assert got.dtype == np.uint8 and got.shape == want.shape
            assert np.array_equal(got, want), f"{kwargs}: largest difference {np.abs(got.astype(int) - want).max()}"
