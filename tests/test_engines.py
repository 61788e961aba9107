"""TensorRT engine plans, tensorrt_plan configs, `build --dry-run`, reference profiles and the memory
estimate: what needs no builder. Real builds, staleness included, run through TensorRT-RTX in
test_trt_rtx.py; the test that needs TensorRT and a GPU is here and skips with the reason elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flux2_klein.configs import config_path
from flux2_klein.sizes import SIZES
from flux2_klein.checkpoint import checkpoint_from_config, load_checkpoint
from flux2_klein.export.tensorrt.build import EnginePlan, check_engine, expected_metadata
from flux2_klein.export.graph_checks import ACTIVATION_BUDGET_BYTES, activation_estimate, instance_estimate
from flux2_klein.sizes import PIXELS_PER_TOKEN_SIDE, REFERENCE_MAX_AREA, REFERENCE_MAX_SIDE, REFERENCE_MIN_SIDE
from flux2_klein.specs import REFERENCE_PROFILE_MAX_AREA, Profile, network_specs
from flux2_klein.export.tensorrt.plan import describe_plan, engine_plans
from flux2_klein.triton_config import GPU_INSTANCES, plan_config

CONFIG_4B = config_path("4b")


def test_plan_config_for_tensorrt(tiny_ckpt):
    specs = network_specs(load_checkpoint(tiny_ckpt))
    dit = plan_config(specs["transformer"], GPU_INSTANCES)
    assert 'platform: "tensorrt_plan"' in dit and 'profile: [ "0", "1", "2" ]' in dit and "KIND_GPU" in dit
    # No CUDA graphs: Triton 25.10's tensorrt_backend never launches them for max_batch_size 0 (triton_config).
    assert "graphs" not in dit and "graph_spec" not in dit
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
    assert "2x20588x128" in out  # an inpainting picture at 800x1328 and three references of a megapixel
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


def test_build_engine_on_a_gpu_with_tensorrt(tiny_ckpt, request, tmp_path, monkeypatch):
    from flux2_klein.export.tensorrt.library import import_trt

    try:
        trt = import_trt("tensorrt")
    except ImportError as e:
        pytest.skip(f"TensorRT is not installed here (it ships in NGC containers): {e}")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: TensorRT engines are built on the GPU they serve")
    from flux2_klein.export.tensorrt.build import TARGET_ENV, build_engine, current_target

    monkeypatch.delenv(TARGET_ENV, raising=False)
    onnx_dir = request.getfixturevalue("onnx_dir")  # exported only where the test can run
    spec = network_specs(load_checkpoint(tiny_ckpt))["vae_decoder"]
    plan = EnginePlan(spec=spec, onnx_path=onnx_dir / "vae_decoder" / "model.onnx",
                      engine_path=tmp_path / "model.plan", precision="bf16", timing_cache=tmp_path / "timing.cache")
    build_engine(plan, trt=trt)
    assert check_engine(plan, expected_metadata(plan, current_target(trt))) is None  # builder "tensorrt"
    assert plan.timing_cache.stat().st_size > 0
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX2_KLEIN_TENSORRT")}
    r = subprocess.run([sys.executable, "-m", "flux2_klein.cli", "build", "--checkpoint", str(tiny_ckpt),
                        "--out", str(tmp_path / "repo"), "--runtime", "tensorrt"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and ("tensorrt: not installed" in r.stderr or "gpu: no CUDA device" in r.stderr)
    assert not (tmp_path / "repo.work").exists()


def _preprocessed_reference_shapes():
    """Every (height, width) preprocessing can hand the VAE encoder, worked out from the rules (sides
    multiples of 16 from 64 to 2896, at most 1024 x 1024 pixels), not from the profiles."""
    sides = range(REFERENCE_MIN_SIDE, REFERENCE_MAX_SIDE + 1, PIXELS_PER_TOKEN_SIDE)
    return [(h, w) for h in sides for w in sides if h * w <= REFERENCE_MAX_AREA]


def test_reference_profiles_hold_every_reference_and_are_bounded_by_area(tiny_ckpt):
    spec = network_specs(load_checkpoint(tiny_ckpt))["vae_encoder"]
    shapes = _preprocessed_reference_shapes()
    assert (2896, 352) in shapes and (64, 2896) in shapes and (1024, 1024) in shapes
    assert [s for s in shapes if spec.profile_for(height=s[0], width=s[1]) is None] == []
    # An inpainting picture is encoded at the output size: every one of the 17 (672x1568 is over 1 MP).
    assert [(w, h) for w, h in SIZES if spec.profile_for(height=h, width=w) is None] == []
    for p in spec.profiles:
        assert p.dims["height"][2] * p.dims["width"][2] <= REFERENCE_PROFILE_MAX_AREA, p.name
        assert spec.profile_for(height=p.dims["height"][1], width=p.dims["width"][1]) is not None
    assert spec.profiles[0].dims["height"][1] == spec.profiles[0].dims["width"][1] == 1024  # tuned for 1 MP


def test_every_profile_of_the_4b_model_fits_the_activation_budget():
    if not CONFIG_4B.exists():
        pytest.skip(f"{CONFIG_4B} not found")
    ckpt = checkpoint_from_config(CONFIG_4B)
    specs = network_specs(ckpt)
    for spec in specs.values():
        for p in spec.profiles:
            est = activation_estimate(spec, ckpt, p)
            assert est.bytes <= ACTIVATION_BUDGET_BYTES, (spec.name, p.name, est)
    # What the old single 64..2896 box of the VAE encoder would need (2896 x 2896, attention unfused).
    side = Profile("side", {"height": (64, 1024, 2896), "width": (64, 1024, 2896)})
    assert activation_estimate(specs["vae_encoder"], ckpt, side).bytes > ACTIVATION_BUDGET_BYTES
    # The DiT's multi-reference profile fits only if TensorRT fuses attention (the H100 script checks).
    multi = activation_estimate(specs["transformer"], ckpt, specs["transformer"].profiles[-1])
    assert multi.fused and multi.activations + multi.attention_scores > ACTIVATION_BUDGET_BYTES
    # All four engines, one instance each, every profile used: what an 80 GB H100 must hold besides weights.
    assert sum(instance_estimate(s, ckpt) for s in specs.values()) < 48 << 30


def test_every_generated_config_is_a_valid_triton_model_config(tiny_ckpt):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from flux2_klein import triton_config
    from flux2_klein.triton_config import Instances, ensemble_config, leaf_config, preprocess_config, sampler_config

    specs = network_specs(load_checkpoint(tiny_ckpt))
    # The sampler's batching settings, where this version of triton_config has them.
    batching = {"batching": triton_config.Batching()} if hasattr(triton_config, "Batching") else {}
    texts = [ensemble_config(specs)]
    for instances in (Instances(), GPU_INSTANCES):
        texts += [preprocess_config(specs["text_encoder"], instances, {"k": "v"}),
                  sampler_config(specs["text_encoder"], specs["vae_decoder"], instances, params={"k": "v"},
                                 **batching)]
        texts += [leaf_config(s, instances, {"k": "v"}) for s in specs.values()]
    texts += [plan_config(s, GPU_INSTANCES) for s in specs.values()]
    for text in texts:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert config.name and (config.input or config.platform == "ensemble"), text
    with pytest.raises(text_format.ParseError):  # the check can fail: a field Triton does not know
        text_format.Parse(texts[-1] + "profiles: 3\n", model_config_pb2.ModelConfig())
