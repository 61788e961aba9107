"""The tiny checkpoint: the real classes and geometry, loadable by diffusers, sensitive to every input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from flux2_klein.checkpoint import load_checkpoint


def test_layout_and_classes(tiny_ckpt, tiny_pipe):
    ckpt = load_checkpoint(tiny_ckpt)
    assert ckpt.is_distilled and ckpt.default_steps == 4
    assert ckpt.text_layers >= 28  # the pipeline reads hidden states 9, 18 and 27
    assert len(ckpt.vae["block_out_channels"]) == 4
    assert type(tiny_pipe).__name__ == "Flux2KleinPipeline"
    assert type(tiny_pipe.tokenizer).__name__ in ("Qwen2TokenizerFast", "Qwen2Tokenizer")
    assert tiny_pipe.vae_scale_factor == 8  # so 1024x1024 is 64x64 = 4096 tokens, as in the real model


def test_base_checkpoint_is_undistilled(tiny_base_ckpt):
    ckpt = load_checkpoint(tiny_base_ckpt)
    assert not ckpt.is_distilled and ckpt.default_steps == 50 and ckpt.default_guidance == 4.0


def test_chat_template_honours_enable_thinking(tiny_pipe):
    msgs = [{"role": "user", "content": "a cat"}]
    off = tiny_pipe.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tiny_pipe.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert off.startswith("<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n")
    assert off.endswith("<think>\n\n</think>\n\n") and "<think>" not in on
    ids = tiny_pipe.tokenizer(off)["input_ids"]
    assert tiny_pipe.tokenizer.convert_tokens_to_ids("<think>") in ids


def _image(pipe, **kw) -> np.ndarray:
    args = dict(prompt="a red cat", height=1024, width=1024, num_inference_steps=4, guidance_scale=1.0,
                generator=torch.Generator("cpu").manual_seed(0))
    args.update(kw)
    return np.asarray(pipe(**args).images[0]).astype(int)


def _ref(kind: int) -> Image.Image:
    yy, xx = np.mgrid[0:512, 0:768]
    if kind == 0:
        rgb = [xx / 3 % 256, yy / 2 % 256, 0 * xx + 40]
    else:
        rgb = [0 * xx + 200, (xx + yy) % 256, yy / 2 % 256]
    return Image.fromarray(np.stack(rgb, -1).astype(np.uint8))


def test_every_input_visibly_changes_the_image(tiny_pipe):
    base = _image(tiny_pipe)
    with_ref = _image(tiny_pipe, image=[_ref(0)])
    changes = {
        "prompt": _image(tiny_pipe, prompt="a blue dog"),
        "seed": _image(tiny_pipe, generator=torch.Generator("cpu").manual_seed(1)),
        "steps": _image(tiny_pipe, num_inference_steps=3),
        "reference": with_ref,
    }
    assert base.std() > 20  # a picture, not a flat field
    for what, other in changes.items():
        # Well above the contract's tolerance of 2 per channel, so equality tests can tell them apart.
        assert np.abs(other - base).mean() > 2 and np.abs(other - base).max() > 40, what
    other_ref = _image(tiny_pipe, image=[_ref(1)])
    assert np.abs(other_ref - with_ref).mean() > 2 and np.abs(other_ref - with_ref).max() > 40


def test_cli_tiny_and_export_subset(tmp_path):
    ckpt = tmp_path / "ck"
    run = lambda *a: subprocess.run([sys.executable, "-m", "flux2_klein.cli", *a], capture_output=True, text=True)
    r = run("tiny", "--out", str(ckpt), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert json.loads((ckpt / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    r = run("export", "onnx", "--checkpoint", str(ckpt), "--out", str(tmp_path / "onnx"), "--networks", "vae_decoder")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "onnx" / "vae_decoder" / "model.onnx").is_file()
    assert "vae_decoder: trace and convert" in r.stderr  # progress lines as it goes
    r = run("export", "onnx", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = run("export", "onnx", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--networks", "unet")
    assert r.returncode == 2 and "networks: unknown unet" in r.stderr
