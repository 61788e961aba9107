"""Every exported graph parses and builds under TensorRT-RTX, on the CPU, with the profiles we ship."""

from __future__ import annotations

import pytest

from flux2_klein.checkpoint import load_checkpoint
from flux2_klein.export.trt_build import BuildError, build_serialized, import_trt, parse
from flux2_klein.specs import network_specs

trt_rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX wheels (the [test] extra) not installed")


@pytest.mark.parametrize("network", ["text_encoder", "transformer", "vae_decoder", "vae_encoder"])
def test_graph_builds_under_every_profile(onnx_dir, tiny_ckpt, network):
    spec = network_specs(load_checkpoint(tiny_ckpt))[network]
    engine = build_serialized(trt_rtx, onnx_dir / network / "model.onnx", spec)
    assert engine.nbytes > 0
    runtime = trt_rtx.Runtime(trt_rtx.Logger(trt_rtx.Logger.WARNING))
    deserialized = runtime.deserialize_cuda_engine(engine) if hasattr(runtime, "deserialize_cuda_engine") else None
    if deserialized is not None:  # needs a GPU to deserialize; on a CPU building is the proof
        assert deserialized.num_optimization_profiles == len(spec.profiles)


def test_unparseable_graph_is_reported(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(BuildError, match="could not parse"):
        parse(trt_rtx, bad)


def test_unknown_module_is_refused():
    with pytest.raises(ValueError, match="tensorrt module"):
        import_trt("tensorrt_llm")
