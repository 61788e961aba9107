"""TensorRT engine plans, metadata and staleness, tensorrt_plan configs, and `build --dry-run`:
everything about engines that can be checked without TensorRT. Tests that need TensorRT and a GPU
are here too, and skip with the reason where either is missing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flux2_klein.checkpoint import checkpoint_from_config, load_checkpoint
from flux2_klein.export.engines import EnginePlan, Target, check_engine, expected_metadata, file_sha256
from flux2_klein.specs import network_specs
from flux2_klein.tensorrt_build import describe_plan, engine_plans
from flux2_klein.triton_config import GPU_INSTANCES, plan_config

CONFIG_4B = Path(__file__).resolve().parents[2] / "shared" / "configs" / "flux2-klein-4b.json"
H100 = Target(tensorrt="10.13.0", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0")


@pytest.fixture
def plan(tiny_ckpt, tmp_path) -> EnginePlan:
    onnx = tmp_path / "work" / "bf16" / "vae_decoder" / "model.onnx"
    onnx.parent.mkdir(parents=True)
    onnx.write_bytes(b"graph v1")
    spec = network_specs(load_checkpoint(tiny_ckpt))["vae_decoder"]
    return EnginePlan(spec=spec, onnx_path=onnx, engine_path=tmp_path / "repo" / "vae_decoder" / "1" / "model.plan",
                      precision="bf16")


def _fake_build(plan: EnginePlan, target: Target, payload: bytes = b"engine bytes") -> None:
    """What build_engine leaves on disk (engine, then metadata), without TensorRT."""
    plan.engine_path.parent.mkdir(parents=True, exist_ok=True)
    plan.engine_path.write_bytes(payload)
    meta = {**expected_metadata(plan, target), "engine_sha256": file_sha256(plan.engine_path)}
    plan.metadata_path.write_text(json.dumps(meta))


def test_missing_engine_and_fresh_engine(plan):
    assert check_engine(plan, expected_metadata(plan, H100)) == "no engine yet"
    _fake_build(plan, H100)
    assert check_engine(plan, expected_metadata(plan, H100)) is None


@pytest.mark.parametrize("change,reason", [
    (lambda p: (p, dataclasses.replace(H100, tensorrt="10.14.1")), "tensorrt changed"),
    (lambda p: (p, dataclasses.replace(H100, gpu="NVIDIA L40S", compute_capability="8.9")), "gpu changed"),
    (lambda p: (dataclasses.replace(p, precision="fp8"), H100), "precision changed"),
    (lambda p: (dataclasses.replace(p, opt_level=5), H100), "opt_level changed"),
])
def test_stale_engines_are_detected(plan, change, reason):
    _fake_build(plan, H100)
    new_plan, new_target = change(plan)
    assert reason in check_engine(new_plan, expected_metadata(new_plan, new_target))


def test_new_graph_or_tampered_engine_or_interrupted_build_is_stale(plan):
    _fake_build(plan, H100)
    plan.onnx_path.write_bytes(b"graph v2")  # re-exported with other weights
    assert "onnx_sha256 changed" in check_engine(plan, expected_metadata(plan, H100))
    _fake_build(plan, H100)
    plan.engine_path.write_bytes(b"something else")
    assert "does not match" in check_engine(plan, expected_metadata(plan, H100))
    plan.metadata_path.unlink()  # an engine written, its metadata not: the build did not finish
    assert "no metadata" in check_engine(plan, expected_metadata(plan, H100))


def test_profiles_change_makes_engines_stale(plan, tiny_ckpt):
    _fake_build(plan, H100)
    spec = plan.spec
    narrower = dataclasses.replace(spec, profiles=(dataclasses.replace(
        spec.profiles[0], dims={**spec.profiles[0].dims, "rows": (42, 64, 90)}),))
    new = dataclasses.replace(plan, spec=narrower)
    assert "profiles changed" in check_engine(new, expected_metadata(new, H100))


def test_plan_config_for_tensorrt(tiny_ckpt):
    specs = network_specs(load_checkpoint(tiny_ckpt))
    dit = plan_config(specs["transformer"], GPU_INSTANCES)
    assert 'platform: "tensorrt_plan"' in dit and 'profile: [ "0", "1", "2" ]' in dit and "KIND_GPU" in dit
    assert 'input { key: "hidden_states" value { dim: [ 1, 4096, 32 ] } }' in dit  # CUDA graph at the opt shape
    te = plan_config(specs["text_encoder"], GPU_INSTANCES)
    assert "response_cache { enable: true }" in te and "dims: [ -1, 512 ]" in te


def test_dry_run_shows_a_complete_plan_for_the_real_4b_model(tmp_path):
    if not CONFIG_4B.exists():
        pytest.skip(f"{CONFIG_4B} not found")
    r = subprocess.run([sys.executable, "-m", "flux2_klein.cli", "build", "--runtime", "tensorrt", "--precision",
                        "fp8", "--dry-run", "--config", str(CONFIG_4B), "--out", str(tmp_path / "repo")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name in ("text_encoder", "transformer", "vae_decoder", "vae_encoder"):
        assert f"[{name}]" in out
    assert "[transformer] fp8" in out and "[vae_decoder] bf16" in out
    assert "hidden_states 1x4042x128 / 1x4096x128 / 2x4150x128" in out  # text-to-image profile
    assert "2x20534x128" in out  # four references of a megapixel each
    assert "encoder_hidden_states 1x512x7680" in out
    assert out.count("trtexec --onnx=") == 4 and out.count("--stronglyTyped") == 4
    assert not (tmp_path / "repo").exists()  # a dry run writes nothing


def test_engine_plans_follow_the_precision(tiny_ckpt, tmp_path):
    ckpt = load_checkpoint(tiny_ckpt)
    fp8 = {p.spec.name: p.precision for p in engine_plans(ckpt, tmp_path / "r", tmp_path / "w", "fp8")}
    assert fp8 == {"text_encoder": "bf16", "transformer": "fp8", "vae_decoder": "bf16", "vae_encoder": "bf16"}
    assert set(p.precision for p in engine_plans(ckpt, tmp_path / "r", tmp_path / "w", "bf16")) == {"bf16"}
    with pytest.raises(ValueError, match="precision: 'int4'"):
        engine_plans(ckpt, tmp_path / "r", tmp_path / "w", "int4")
    assert "profile t2i" in describe_plan(ckpt, tmp_path / "r", tmp_path / "w", "fp8")


def test_build_engine_on_a_gpu_with_tensorrt(tiny_ckpt, onnx_dir, tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed here (it ships in NGC containers)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT engines are built on the GPU they serve")
    from flux2_klein.export.engines import build_engine, current_target

    spec = network_specs(load_checkpoint(tiny_ckpt))["vae_decoder"]
    plan = EnginePlan(spec=spec, onnx_path=onnx_dir / "vae_decoder" / "model.onnx",
                      engine_path=tmp_path / "model.plan", precision="bf16", timing_cache=tmp_path / "timing.cache")
    build_engine(plan, trt=trt)
    assert check_engine(plan, expected_metadata(plan, current_target(trt))) is None
    mtime = plan.engine_path.stat().st_mtime
    build_engine(plan, trt=trt)  # fresh: reused, not rebuilt
    assert plan.engine_path.stat().st_mtime == mtime


def test_config_geometry_matches_a_real_checkpoint_layout(tiny_ckpt):
    if not CONFIG_4B.exists():
        pytest.skip(f"{CONFIG_4B} not found")
    ckpt = checkpoint_from_config(CONFIG_4B)
    assert ckpt.latent_channels == 128 and ckpt.text_hidden == 2560 and ckpt.is_distilled


def test_tensorrt_build_without_tensorrt_or_gpu_says_so_at_once(tiny_ckpt, tmp_path):
    import importlib.util

    import torch

    if importlib.util.find_spec("tensorrt") and torch.cuda.is_available():
        pytest.skip("this machine has TensorRT and a GPU: the build would really run")
    r = subprocess.run([sys.executable, "-m", "flux2_klein.cli", "build", "--checkpoint", str(tiny_ckpt),
                        "--out", str(tmp_path / "repo"), "--runtime", "tensorrt"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and ("tensorrt: not installed" in r.stderr or "gpu: no CUDA device" in r.stderr)
    assert not (tmp_path / "repo.work").exists()
