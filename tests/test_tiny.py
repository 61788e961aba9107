"""The tiny checkpoint: the real classes and geometry, loadable by diffusers, sensitive to every input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------------------------------ full size, written fast

def _reduced_4b_config(tmp_path) -> Path:
    """The shipped 4B config with depth, widths and vocabulary cut down to CPU size (the pipeline computes
    logits over the whole vocabulary); latent channels, VAE depth and the text layers the pipeline reads
    (9, 18, 27) stay real."""
    from flux2_klein.configs import config_path

    cfg = json.loads(config_path("4b").read_text())
    cfg["text_encoder"].update(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=28, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16)
    cfg["transformer"].update(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
                              axes_dims_rope=[8, 8, 8, 8], joint_attention_dim=3 * 64)
    cfg["vae"].update(block_out_channels=[32, 32, 64, 64], layers_per_block=1)
    path = tmp_path / "reduced-4b.json"
    path.write_text(json.dumps(cfg))
    return path


def test_full_size_checkpoint_written_fast_loads_in_diffusers(tmp_path):
    import hashlib
    import time

    from diffusers import Flux2KleinPipeline
    from safetensors import safe_open

    from flux2_klein.tiny import make_full_size

    config = _reduced_4b_config(tmp_path)
    start = time.perf_counter()
    ckpt = make_full_size(tmp_path / "ck", config, seed=5, workers=2)
    print(f"reduced 4B checkpoint written in {time.perf_counter() - start:.2f} s")
    load_checkpoint(ckpt)  # our own checks accept it
    # Computed in float32 (CPU bf16 convolutions are slow): bf16 has float32's exponent range, so what
    # stays finite here stays finite in bf16; the bf16 weights upcast exactly (compared below).
    pipe = Flux2KleinPipeline.from_pretrained(ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    files = {"text_encoder": "model.safetensors", "transformer": "diffusion_pytorch_model.safetensors",
             "vae": "diffusion_pytorch_model.safetensors"}
    for name, file in files.items():
        module = getattr(pipe, name)
        with safe_open(ckpt / name / file, "pt") as f:
            keys = set(f.keys())
            expected = set(module.state_dict()) - ({"lm_head.weight"} if name == "text_encoder" else set())
            assert keys == expected, (name, sorted(keys ^ expected)[:5])  # nothing missing, nothing unused
            for key in keys:  # every tensor was really loaded, not re-initialised
                assert torch.equal(f.get_tensor(key).to(torch.bfloat16), module.state_dict()[key].to(torch.bfloat16)), key
    te = pipe.text_encoder
    assert torch.equal(te.lm_head.weight, te.model.embed_tokens.weight)  # tied, as in the real model
    assert torch.all(pipe.transformer.transformer_blocks[0].attn.norm_q.weight == 1)
    assert torch.all(pipe.vae.bn.running_var == 1) and torch.all(pipe.vae.bn.running_mean == 0)
    w = pipe.transformer.transformer_blocks[0].ff.linear_in.weight.detach().float()
    assert abs(float(w.std()) * w.shape[1] ** 0.5 - 1) < 0.05  # std 1/sqrt(fan-in)

    image = pipe(prompt="a red fox", height=128, width=128, num_inference_steps=1, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.isfinite(image).all() and image.std() > 0.01, image.std()

    # The same bytes whatever the number of threads that drew them.
    again = make_full_size(tmp_path / "again", config, seed=5, workers=1)
    digest = lambda p: hashlib.sha256((p / "transformer" / files["transformer"]).read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(ckpt)
