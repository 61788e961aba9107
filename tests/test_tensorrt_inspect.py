"""The engine inspector's classification reads TensorRT's own fields (LayerType, TacticName, the inputs'
Format/Datatype), never the ONNX node names TensorRT copies into a layer's Name and Metadata; the H100
report's summary is assembled from what bench/h100_tensorrt.sh leaves."""

import json

from flux2_klein.export.tensorrt.inspect import build_times, classify, summarize, summary_markdown


def _layer(name, kind, tactic="", formats=("Row major linear BFloat16 format",), metadata=""):
    return {"Name": name, "LayerType": kind, "TacticName": tactic, "Metadata": metadata,
            "Inputs": [{"Name": "x", "Dimensions": [1, 8], "Format/Datatype": f} for f in formats], "Outputs": []}


FUSED = [
    _layer("/blocks.0/attn/to_q/MatMul", "CaskGemmMatrixMultiply", "sm90_xmma_gemm_e4m3f32_e4m3f32_tn",
           ("Row major linear FP8 format", "Row major linear FP8 format")),
    _layer("/blocks.0/ff/MatMul", "gemm", "sm90_xmma_gemm_bf16bf16_bf16f32", metadata="[ONNX Layer: /ff/MatMul]"),
    _layer("/blocks.0/attn/scaled_dot_product_attention", "CaskFlashAttention", "fmha_v2_flash_attention_bf16_sm90"),
]
# What an engine without fusion looks like: the ONNX names are still there, the kinds are plain.
UNFUSED = [
    _layer("/blocks.0/attn/scaled_dot_product_attention/MatMul", "CaskGemmMatrixMultiply", "sm90_xmma_gemm_bf16",
           metadata="[ONNX Layer: /blocks.0/attn/scaled_dot_product_attention]"),
    _layer("/blocks.0/attn/Softmax fp8 e4m3 attention", "CaskSoftMax", "softmax_bf16"),
    _layer("/blocks.0/attn/to_q/MatMul_fp8", "CaskGemmMatrixMultiply", "sm90_xmma_gemm_bf16"),
]


def test_fused_layers_are_counted_from_tensorrts_fields():
    assert summarize(FUSED) == {"layers": 3, "fp8_gemms": 1, "gemms": 2, "fused_attention": 1}


def test_onnx_names_in_name_and_metadata_do_not_count_as_fusion_or_fp8():
    assert summarize(UNFUSED) == {"layers": 3, "fp8_gemms": 0, "gemms": 2, "fused_attention": 0}
    assert classify("bare name at lower verbosity: MatMul attention fp8") == {"gemm": False, "fp8": False,
                                                                              "attention": False}


def test_the_summary_states_each_engine_with_memory_and_build_time(tmp_path):
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "transformer.layers.json").write_text(json.dumps(
        {"profiles": 3, "device_memory_gib": 4.25, "summary": summarize(FUSED)}))
    (tmp_path / "build.log").write_text("transformer: build (fp8, level 3, 3 profile(s)) ...\n"
                                        "transformer: build (fp8, level 3, 3 profile(s)): done in 1234.5 s\n")
    assert build_times((tmp_path / "build.log").read_text()) == {"transformer": 1234.5}
    md = summary_markdown(tmp_path)
    assert "| transformer | 3 | 2 | 1 | 1 | 4.25 GiB | 1234 s |" in md and "(no bench report)" in md
