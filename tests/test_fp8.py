"""FP8 (E4M3) DiT: calibrated with ModelOpt on the real pipeline, exported with Q/DQ; its accuracy
against the float graph per network under ONNX Runtime (which runs FP8 Q/DQ on the CPU) and end to
end through a Triton repository; and TensorRT-RTX's verdict on the graph."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from conftest import ServeCommand
from flux2_klein.checkpoint import load_checkpoint
from flux2_klein.export.fp8 import load_prompts
from flux2_klein.networks import KEEP_HIGH_PRECISION
from flux2_klein.specs import example_inputs, network_specs

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt not installed")

# Thresholds from values measured on the tiny checkpoint (seed 0) with this fixture's calibration, each
# case's PSNR minus a 0.5 dB margin: tight on purpose. FP8 keeps ~2**-4 relative precision anywhere in its
# range, so a calibration bug that halves the activation scales only clips the largest activations and
# costs about 1 dB (measured: 30.94 -> 29.74 dB and 29.76 -> 28.86 dB); a looser bound would let it pass.
# test_halved_activation_scale_fails_the_threshold proves these bounds catch it.
VELOCITY_CASES = {  # id: (size, references, minimum PSNR in dB)
    "t2i-1024x1024": ((1024, 1024), (), 30.94 - 0.5),
    "edit-672x1568": ((672, 1568), ((768, 512),), 29.76 - 0.5),
}
# End to end, FP8 server against the float server, per request: measured 26.7 and 27.7 dB; minimum 1 dB
# below each (the error passes through four steps and the VAE, so it gets a wider margin than the velocity;
# a halved scale is proven caught at the velocity, where it costs as much).
IMAGE_CASES = [  # prompt, (width, height), seed, minimum PSNR in dB
    ("fp8 end to end", (1024, 1024), 3, 26.7 - 1.0),
    ("another", (1248, 832), 9, 27.7 - 1.0),
]


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


@pytest.fixture(scope="module")
def fp8_dir(tiny_ckpt, tmp_path_factory):
    from flux2_klein.export.fp8 import export_fp8

    out = tmp_path_factory.mktemp("fp8")
    # fp32 around the FP8 GEMMs so that ONNX Runtime can run it on a CPU; one text-to-image prompt and
    # one edit (run with the first image as its reference), at the square size: enough to calibrate
    # a one-block model, small enough for CI.
    prompts = [p for p in load_prompts() if not p.startswith("edit: ")][:2] + \
              [p for p in load_prompts() if p.startswith("edit: ")][:1]
    export_fp8(tiny_ckpt, out, dtype="fp32", prompts=prompts, sizes=((1024, 1024),))
    return out


def test_graph_has_fp8_qdq_where_recipes_put_it(fp8_dir):
    model = onnx.load(fp8_dir / "transformer" / "model.onnx")
    meta = json.loads((fp8_dir / "transformer" / "model.json").read_text())
    assert meta["precision"] == "fp8" and meta["opset"] >= 19
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    fp8_weights = [i for i in model.graph.initializer
                   if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and i.name.endswith("weight_e4m3")]
    # Layers reading the same activation (to_q/to_k/to_v) calibrate the same scale and share one Q/DQ
    # after the exporter's common-subexpression pass; every layer keeps its own FP8 weight.
    assert 0 < len(q) <= meta["fp8_layers"]
    assert len(fp8_weights) == meta["fp8_layers"] and len(dq) == len(q) + meta["fp8_layers"]
    # Every weight DQ feeds a MatMul directly: the pattern TensorRT fuses into an FP8 GEMM.
    consumers = {i: n.op_type for n in model.graph.node for i in n.input}
    weight_dq = [n for n in dq if n.input[0] in {w.name for w in fp8_weights}]
    assert weight_dq and all(consumers[n.output[0]] == "MatMul" for n in weight_dq)
    scales = json.loads((fp8_dir / "transformer" / "fp8_scales.json").read_text())
    assert not any(n.startswith(("x_embedder", "context_embedder", "proj_out", "norm_out")) or "modulation" in n
                   or n.startswith("time_guidance_embed") for n in scales), KEEP_HIGH_PRECISION
    assert any(n.startswith("transformer_blocks.0.attn") for n in scales)
    assert any(n.startswith("single_transformer_blocks.0") for n in scales)


def _velocity_psnr(graph, onnx_dir, tiny_ckpt, ort_session, size, references) -> float:
    spec = network_specs(load_checkpoint(tiny_ckpt))["transformer"]
    inputs = example_inputs(spec, np.random.default_rng(5), batch=1, size=size, references=references)
    fp8 = ort_session(graph).run(None, inputs)[0]
    ref = ort_session(onnx_dir / "transformer" / "model.onnx").run(None, inputs)[0]
    assert not np.array_equal(fp8, ref)  # it really is quantized
    peak = float(np.abs(ref).max())
    value = psnr(fp8, ref, peak)
    print(f"FP8 vs float velocity {size} refs={len(references)}: PSNR {value:.2f} dB, "
          f"max abs err {np.abs(fp8 - ref).max():.4f} of peak {peak:.2f}")
    return value


@pytest.mark.parametrize("case", list(VELOCITY_CASES))
def test_fp8_velocity_close_to_float(fp8_dir, onnx_dir, tiny_ckpt, ort_session, case):
    size, references, minimum = VELOCITY_CASES[case]
    value = _velocity_psnr(fp8_dir / "transformer" / "model.onnx", onnx_dir, tiny_ckpt, ort_session, size, references)
    assert value >= minimum, f"{value:.2f} dB < {minimum:.2f} dB"


def _scale_activations(model: onnx.ModelProto, factor: float) -> int:
    """Multiply every activation scale of the graph's Q/DQ pairs by `factor`, as a calibration that got amax
    wrong would; the weights' scales stay. Returns how many scale tensors changed."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    names = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    names |= {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantized}
    for name in names:
        value = numpy_helper.to_array(initializers[name])
        initializers[name].CopyFrom(numpy_helper.from_array((value * factor).astype(value.dtype), name))
    return len(names)


@pytest.mark.parametrize("case", list(VELOCITY_CASES))
def test_halved_activation_scale_fails_the_threshold(fp8_dir, onnx_dir, tiny_ckpt, ort_session, tmp_path, case):
    size, references, minimum = VELOCITY_CASES[case]
    model = onnx.load(fp8_dir / "transformer" / "model.onnx")
    assert _scale_activations(model, 0.5) > 0
    broken = tmp_path / "model.onnx"
    onnx.save(model, broken)
    value = _velocity_psnr(broken, onnx_dir, tiny_ckpt, ort_session, size, references)
    assert value < minimum, f"a halved activation scale still gives {value:.2f} dB >= {minimum:.2f} dB"


def test_fp8_end_to_end_through_triton(fp8_dir, onnx_dir, tiny_ckpt, triton_server, tmp_path):
    from flux2_klein.client.triton_client import Flux2KleinClient
    from flux2_klein.repository import build_repository

    mixed = tmp_path / "onnx"
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        shutil.copytree(onnx_dir / name, mixed / name)
    shutil.copytree(fp8_dir / "transformer", mixed / "transformer")
    repo = build_repository(tiny_ckpt, tmp_path / "repo", onnx_dir=mixed)
    server = ServeCommand.started(repo, tmp_path)
    try:
        values = []
        for prompt, (w, h), seed, _ in IMAGE_CASES:
            with Flux2KleinClient(server.grpc_url) as fp8c, Flux2KleinClient(triton_server.grpc_url) as floatc:
                got = fp8c.generate(prompt, width=w, height=h, seed=seed)
                want = floatc.generate(prompt, width=w, height=h, seed=seed)
            values.append(psnr(got, want, 255.0))
        print("FP8 vs float image PSNR (dB):", [round(v, 1) for v in values])
        for value, (prompt, *_, minimum) in zip(values, IMAGE_CASES):
            assert value >= minimum, f"{prompt!r}: {value:.2f} dB < {minimum:.2f} dB"
    finally:
        server.stop()


def test_fp8_graph_under_tensorrt_rtx(fp8_dir, tiny_ckpt):
    trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX wheels not installed")
    from flux2_klein.export.tensorrt.build import EnginePlan, serialize
    from flux2_klein.export.tensorrt.library import BuildError, parse

    path = fp8_dir / "transformer" / "model.onnx"
    _builder, network, _ = parse(trt, path)
    assert network.num_layers > 0
    spec = network_specs(load_checkpoint(tiny_ckpt))["transformer"]
    plan = EnginePlan(spec=spec, onnx_path=path, engine_path=path.with_suffix(".plan"), precision="fp8")
    try:
        engine, _cache = serialize(trt, plan, None)  # the one build path
    except BuildError as e:  # pragma: no cover - depends on what TensorRT-RTX supports on a CPU
        pytest.skip(f"TensorRT-RTX parses the FP8 graph but cannot build it on a CPU: {e}")
    assert engine.nbytes > 0


