"""The production TensorRT builder (`export/tensorrt/build.py: build_engine`, `export engines`, `build --runtime tensorrt`)
run end to end on a CPU through TensorRT-RTX, for a named FP8-capable target, on the production formats
of the tiny checkpoint: BF16 graphs and the FP8 DiT with BF16 scales. Also the FP8 graph's pattern, the
opsets, and every generated config.pbtxt as Triton's own ModelConfig protobuf."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from flux2_klein.checkpoint import load_checkpoint
from flux2_klein.export.tensorrt.build import (
    TARGET_ENV, EnginePlan, Target, build_engine, check_engine, check_target, current_target, expected_metadata,
    parse_target, parser_max_opset,
)
from flux2_klein.export.graph_checks import fp8_pattern_problems, opset_of
from flux2_klein.export.tensorrt.library import FLAVOUR_ENV, BuildError, check_install, import_trt, parse
from flux2_klein.specs import network_specs
from flux2_klein.export.tensorrt.plan import engine_plans

try:
    trt = import_trt("tensorrt_rtx")
except ImportError as e:  # pragma: no cover - the [test] extra installs it
    pytest.skip(f"TensorRT-RTX (the [test] extra) not installed: {e}", allow_module_level=True)

GPU = "NVIDIA GeForce RTX 4090"
TARGET = Target(tensorrt=str(trt.__version__), gpu=GPU, compute_capability="8.9")  # Ada: FP8 tensor cores
ENV = {**os.environ, FLAVOUR_ENV: "tensorrt_rtx", TARGET_ENV: f"gpu={GPU},compute_capability=8.9"}
CLI = [sys.executable, "-m", "flux2_klein.cli"]


@pytest.fixture(scope="module")
def work(tiny_ckpt, tmp_path_factory) -> Path:
    """A production work folder: bf16/<network> for all four, fp8/transformer with BF16 scales."""
    from flux2_klein.export.fp8 import calibrate_scales, export_fp8, load_prompts
    from flux2_klein.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("trt-work")
    export_onnx(tiny_ckpt, out / "bf16", dtype="bf16")
    # Calibrated in fp32 on one prompt (fast on a CPU); the graph is exported in BF16 as production does.
    scales, _ = calibrate_scales(tiny_ckpt, dtype="fp32", prompts=load_prompts(limit=1), sizes=((1024, 1024),))
    export_fp8(tiny_ckpt, out / "fp8", dtype="bf16", scales=scales)
    return out


@pytest.fixture(scope="module")
def repo(work, tiny_ckpt, tmp_path_factory) -> Path:
    """`flux2-klein export engines` as a user runs it, every engine of the fp8 plan."""
    out = tmp_path_factory.mktemp("trt-repo") / "repo"
    r = subprocess.run([*CLI, "export", "engines", "--checkpoint", str(tiny_ckpt), "--onnx", str(work),
                        "--out", str(out), "--precision", "fp8"], env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_export_engines_builds_every_engine_for_the_named_target(repo, work, tiny_ckpt):
    plans = engine_plans(load_checkpoint(tiny_ckpt), repo, work, "fp8")
    for plan in plans:
        assert check_engine(plan, expected_metadata(plan, TARGET, builder="tensorrt_rtx")) is None, plan.spec.name
        meta = json.loads(plan.metadata_path.read_text())
        assert (meta["gpu"], meta["compute_capability"], meta["builder"]) == (GPU, "8.9", "tensorrt_rtx")
        assert len(meta["profiles"]) == len(plan.spec.profiles)
    assert {p.spec.name: p.precision for p in plans}["transformer"] == "fp8"
    # The same engines are stale for the H100 a user serves on: never loaded there.
    h100 = Target("10.13.3.9", "NVIDIA H100 80GB HBM3", "9.0")
    assert "tensorrt changed" in check_engine(plans[0], expected_metadata(plans[0], h100, builder="tensorrt_rtx"))


def test_build_runtime_tensorrt_reuses_fresh_engines_and_writes_triton_configs(repo, work, tiny_ckpt):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    engines = sorted(repo.glob("*/1/model.plan"))
    mtimes = {p: p.stat().st_mtime_ns for p in engines}
    r = subprocess.run([*CLI, "build", "--checkpoint", str(tiny_ckpt), "--out", str(repo), "--runtime", "tensorrt",
                        "--precision", "fp8", "--work", str(work)], env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(engines) == 4 and {p: p.stat().st_mtime_ns for p in engines} == mtimes  # reused, not rebuilt
    assert json.loads((repo / "build.json").read_text())["runtime"] == "tensorrt"
    configs = {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}
    assert len(configs) == 7
    for name, text in configs.items():
        config = text_format.Parse(text, model_config_pb2.ModelConfig())  # Triton's own schema
        assert config.name == name
        if (repo / name / "1" / "model.plan").exists():
            assert config.platform == "tensorrt_plan"
            assert list(config.instance_group[0].profile) == [str(i) for i in range(len(
                network_specs(load_checkpoint(tiny_ckpt))[name].profiles))]


def test_the_production_builder_rebuilds_what_is_stale(work, tiny_ckpt, tmp_path):
    spec = network_specs(load_checkpoint(tiny_ckpt))["vae_decoder"]
    plan = EnginePlan(spec=spec, onnx_path=work / "bf16" / "vae_decoder" / "model.onnx",
                      engine_path=tmp_path / "vae_decoder" / "1" / "model.plan", precision="bf16")
    build_engine(plan, trt=trt, target=TARGET)
    first = plan.engine_path.stat().st_mtime_ns
    build_engine(plan, trt=trt, target=TARGET)
    assert plan.engine_path.stat().st_mtime_ns == first  # fresh: reused

    other = dataclasses.replace(TARGET, gpu="NVIDIA RTX 6000 Ada Generation")
    assert "gpu changed" in check_engine(plan, expected_metadata(plan, other, builder="tensorrt_rtx"))
    build_engine(plan, trt=trt, target=other)
    assert json.loads(plan.metadata_path.read_text())["gpu"] == other.gpu

    plan.engine_path.write_bytes(b"truncated")  # a damaged engine
    build_engine(plan, trt=trt, target=other)
    assert check_engine(plan, expected_metadata(plan, other, builder="tensorrt_rtx")) is None
    plan.metadata_path.unlink()  # an engine without metadata: an interrupted build
    build_engine(plan, trt=trt, target=other)
    assert plan.metadata_path.is_file() and not list(plan.engine_path.parent.glob("*.partial"))


def test_a_target_the_builder_cannot_meet_is_refused(monkeypatch):
    with pytest.raises(BuildError, match="target tensorrt: 10.13.3.9"):
        check_target(trt, dataclasses.replace(TARGET, tensorrt="10.13.3.9"))
    with pytest.raises(BuildError, match="compute_capability: 9.0 is not one TensorRT-RTX"):
        check_target(trt, dataclasses.replace(TARGET, compute_capability="9.0"))  # no Hopper in RTX
    with pytest.raises(BuildError, match="expected MAJOR.MINOR"):
        check_target(trt, dataclasses.replace(TARGET, compute_capability="ada"))
    with pytest.raises(BuildError, match="compute_capability missing"):
        parse_target("gpu=Some GPU", trt)
    assert parse_target(f"gpu={GPU}, compute_capability=8.9", trt) == TARGET
    monkeypatch.delenv(TARGET_ENV, raising=False)
    with pytest.raises(BuildError, match=TARGET_ENV):  # a CPU cannot detect a target
        current_target(trt)


def test_an_fp8_engine_for_a_gpu_without_fp8_fails_to_build(work, tiny_ckpt, tmp_path):
    spec = network_specs(load_checkpoint(tiny_ckpt))["transformer"]
    plan = EnginePlan(spec=spec, onnx_path=work / "fp8" / "transformer" / "model.onnx",
                      engine_path=tmp_path / "model.plan", precision="fp8")
    with pytest.raises(BuildError, match="could not build"):
        build_engine(plan, trt=trt, target=dataclasses.replace(TARGET, compute_capability="8.6"))  # Ampere
    assert not plan.engine_path.exists() and not plan.metadata_path.exists()


def test_a_graph_above_the_builders_opset_is_refused(work, tiny_ckpt, tmp_path):
    src = work / "bf16" / "vae_decoder"
    copy = shutil.copytree(src, tmp_path / "vae_decoder")
    meta = json.loads((copy / "model.json").read_text())
    (copy / "model.json").write_text(json.dumps({**meta, "opset": 25}))
    spec = network_specs(load_checkpoint(tiny_ckpt))["vae_decoder"]
    plan = EnginePlan(spec=spec, onnx_path=copy / "model.onnx", engine_path=tmp_path / "e.plan", precision="bf16")
    with pytest.raises(BuildError, match="opset 25, but tensorrt_rtx"):
        build_engine(plan, trt=trt, target=TARGET)


def test_every_graph_is_within_the_opset_both_builders_parse(work):
    dockerfile = (Path(__file__).resolve().parents[1] / "docker" / "Dockerfile").read_text()
    image_trt = dockerfile.split("ARG TENSORRT_VERSION=", 1)[1].split()[0]
    limit = min(parser_max_opset("tensorrt", image_trt), parser_max_opset("tensorrt_rtx", str(trt.__version__)))
    graphs = sorted(work.glob("*/*/model.onnx"))
    assert len(graphs) == 5
    for path in graphs:
        opset = opset_of(onnx.load(path, load_external_data=False))
        assert opset <= limit and opset == json.loads((path.parent / "model.json").read_text())["opset"], path


def test_fp8_weights_feed_matmuls_directly_with_scalar_scales(work, tmp_path):
    from onnx import helper

    model = onnx.load(work / "fp8" / "transformer" / "model.onnx")
    assert fp8_pattern_problems(model) == []
    # Broken on purpose: a Cast between one weight's DequantizeLinear and its MatMul.
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_e4m3"))
    matmul = next(n for n in model.graph.node if dq.output[0] in n.input)
    cast_out = dq.output[0] + "_cast"
    model.graph.node.append(helper.make_node("Cast", [dq.output[0]], [cast_out], to=onnx.TensorProto.FLOAT))
    matmul.input[list(matmul.input).index(dq.output[0])] = cast_out
    assert any("feeds ['Cast']" in p for p in fp8_pattern_problems(model))
    # And a per-channel (vector) scale.
    scale = next(i for i in model.graph.initializer if i.name == dq.input[1])
    scale.dims[:] = [1, 1]
    assert any("not a scalar" in p for p in fp8_pattern_problems(model))


def test_the_images_install_check_builds_a_builder_and_parses():
    assert "Builder and OnnxParser work" in check_install(trt, str(trt.__version__))
    r = subprocess.run([sys.executable, "-m", "flux2_klein.export.tensorrt", "--check", "--flavour", "tensorrt_rtx",
                        "--version", "0.0.1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "expected 0.0.1" in r.stderr


def test_unparseable_graph_is_reported(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(BuildError, match="could not parse"):
        parse(trt, bad)


def test_unknown_flavour_is_refused():
    with pytest.raises(ValueError, match="tensorrt flavour: 'tensorrt_llm'"):
        import_trt("tensorrt_llm")


def test_a_failed_build_keeps_its_finished_engines_and_the_next_build_builds_only_the_rest(work, tiny_ckpt,
                                                                                          tmp_path):
    """As in the container: a build into a temporary repository fails at the last engine and its folder is
    removed; the next build, over the same persistent work folder, builds only the engine still missing."""
    w = tmp_path / "work"
    shutil.copytree(work, w, ignore=shutil.ignore_patterns("engines"))
    graph = w / "bf16" / "vae_encoder" / "model.onnx"  # the last network built
    good = graph.read_bytes()
    graph.write_bytes(b"not a graph")
    cmd = [*CLI, "build", "--checkpoint", str(tiny_ckpt), "--runtime", "tensorrt", "--precision", "fp8",
           "--work", str(w)]
    r = subprocess.run([*cmd, "--out", str(tmp_path / "first")], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "vae_encoder" in r.stderr, r.stderr[-3000:]
    kept = sorted(p.parent.name for p in (w / "engines").glob("*/model.plan"))
    assert kept == ["text_encoder", "transformer", "vae_decoder"], kept
    mtimes = {p: p.stat().st_mtime_ns for p in (w / "engines").glob("*/model.plan")}
    shutil.rmtree(tmp_path / "first")
    graph.write_bytes(good)
    r = subprocess.run([*cmd, "--out", str(tmp_path / "second")], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("building engine for") == 1 and "vae_encoder: building engine" in r.stderr, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # kept engines reused, not rebuilt
    for name in ("text_encoder", "transformer", "vae_decoder", "vae_encoder"):
        served = tmp_path / "second" / name / "1" / "model.plan"
        assert served.read_bytes() == (w / "engines" / name / "model.plan").read_bytes()
        assert (served.with_suffix(".json")).is_file()


def test_the_refit_probe_builds_the_plain_dit_and_records_what_a_cpu_cannot(work, tiny_ckpt, tmp_path):
    """bench/trt_refit_probe.py (the number behind lora_library.py's refusal on tensorrt) as a user runs it."""
    out = tmp_path / "refit.json"
    r = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "bench" / "trt_refit_probe.py"),
                        "--onnx", str(work / "bf16" / "transformer" / "model.onnx"), "--checkpoint", str(tiny_ckpt),
                        "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["build_s"]["plain"]) == 1 and result["engine_bytes"]["plain"] > 0
    # Either the refittable engine was built (then its size is recorded) or why not is.
    assert "refit" in result["engine_bytes"] or result["build_failures"]["refit"]
    assert result.get("refittable_weights") or result["refit"].startswith("not measurable here")
