"""The LoRA cost bench (client/bench/lora_cost.py) end to end on the tiny checkpoint: real LoRA files, a real
fused build, the served DiT leaf with its library, and a report whose every case measured what it is named for."""

from __future__ import annotations

import json

import pytest

from flux2_klein.client.bench.lora_cost import CASES, main, markdown, targeted_layers


def test_tiny_scale_report_fields(tiny_ckpt, tmp_path):
    out, md = tmp_path / "report.json", tmp_path / "report.md"
    report = main(["--scales", "tiny", "--tiny-checkpoint", str(tiny_ckpt), "--work", str(tmp_path / "work"),
                   "--size", "512x512", "--rounds", "2", "--rank", "4", "--out", str(out), "--markdown", str(md)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    scale = report["scales"]["tiny"]
    assert set(scale["cases"]) == set(CASES) and scale["image_tokens"] == 1024 and scale["text_tokens"] == 512
    for case in scale["cases"].values():
        assert len(case["samples_ms"]) == 2 and case["min_ms"] <= case["median_ms"] <= case["max_ms"]
        assert case["steps_per_s"] == pytest.approx(1e3 / case["median_ms"], rel=1e-3)
    assert scale["vs_plain"]["plain"] == 1.0 and scale["vs_fused"]["fused"] == 1.0
    check = scale["output_max_abs_diff"]
    # LoRA a unfused is LoRA a fused (to float32 rounding), and it changes the output; none active is plain.
    assert check["unfused_1_vs_fused"] < 1e-3 < check["unfused_1_vs_plain"]
    assert check["unfused_3_vs_unfused_1"] > 1e-3 and check["unfused_0_vs_plain"] == 0.0
    assert scale["activate_ms"]["count"] == 3 * 3 and scale["library_load_s"] > 0 and scale["scan_s"] > 0
    # Every block's attention and MLP projections are adapted: 12 in the double block, 2 in the single one.
    assert scale["flop_share"]["targeted_layers"] == len(targeted_layers(tiny_ckpt)) == 14
    assert report["threads"] == 1 and report["commit"] and report["machine"]["cores"] >= 1
    assert "--scales tiny" in report["command"]
    text = md.read_text()
    assert text == markdown(report) and "| unfused_3 |" in text and "H100" not in text  # no piece, no GPU talk


def test_scales_are_checked():
    with pytest.raises(SystemExit):
        main(["--scales", "huge"])
