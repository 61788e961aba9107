"""Request preprocessing: validation, defaults, and bit-exact agreement with diffusers' pipeline.

The oracle is `Flux2KleinPipeline.__call__` itself on the tiny checkpoint: we stop it where it hands the
preprocessed reference tensors to the VAE (prepare_image_latents) or the token ids to the text encoder,
and compare with what `flux2_klein.request` produces.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from flux2_klein.contract import Defaults
from flux2_klein.request import (
    MAX_DECODE_PIXELS,
    InvalidInput,
    PromptTokenizer,
    Request,
    decode_reference,
    parse_request,
)
from flux2_klein.sizes import SIZES, size_names


def normalize_reference(reference: np.ndarray) -> np.ndarray:
    """What the VAE-encoder network does to a preprocessed reference: float32 [H, W, 3] in [-1, 1]."""
    return 2.0 * (reference.astype(np.float32) / 255.0) - 1.0


class _Stop(Exception):
    """Raised from inside the pipeline once the tensors we compare against have been captured."""


def b(*items) -> np.ndarray:
    """A Triton BYTES tensor as the Python backend hands it over: an object array of bytes."""
    return np.array(list(items), dtype=np.object_)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus fine noise: content on which resampling and cropping show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 120 * np.sin(x / 37.0 + seed)
    g = 127 + 120 * np.cos(y / 23.0)
    bl = (x + y) * 255.0 / (width + height)
    rgb = np.stack([r, g, bl], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- references vs diffusers


@pytest.fixture
def pipeline_references(tiny_pipe, monkeypatch):
    """Runs the pipeline's step 4 ("process images") on PIL images and returns its tensors [1,3,H,W]."""

    def run(images: list[Image.Image]) -> list[torch.Tensor]:
        captured = {}

        def prepare_image_latents(images, **kwargs):
            captured["images"] = images
            raise _Stop

        monkeypatch.setattr(tiny_pipe, "prepare_image_latents", prepare_image_latents)
        with pytest.raises(_Stop):
            tiny_pipe(
                prompt=None, prompt_embeds=torch.zeros(1, 8, tiny_pipe.transformer.config.joint_attention_dim),
                image=images, height=1024, width=1024, num_inference_steps=1, guidance_scale=1.0,
                generator=torch.Generator("cpu").manual_seed(0),
            )
        return captured["images"]

    return run


def _cases():
    def rgba(w, h):
        im = picture(w, h, 1).convert("RGBA")
        alpha = np.fromfunction(lambda y, x: (x * 255 // w), (h, w)).astype(np.uint8)
        im.putalpha(Image.fromarray(alpha, "L"))
        return im

    def palette(w, h, transparency=False):
        im = picture(w, h, 2).quantize(colors=64)
        if transparency:
            im.info["transparency"] = 3
        return im

    def la(w, h):
        im = picture(w, h, 3).convert("LA")
        im.putalpha(Image.fromarray(np.full((h, w), 90, np.uint8), "L"))
        return im

    return {
        # name: (encoded bytes, expected preprocessed (width, height))
        "png-small-odd-200x137": (encode(picture(200, 137), "PNG"), (192, 128)),
        "png-1024x1024-equal-area": (encode(picture(1024, 1024), "PNG"), (1024, 1024)),
        "png-1025x1024-just-over": (encode(picture(1025, 1024), "PNG"), None),
        "png-1000x777": (encode(picture(1000, 777), "PNG"), (992, 768)),
        "jpeg-3000x2000": (encode(picture(3000, 2000), "JPEG", quality=90), None),
        "png-64x500": (encode(picture(64, 500), "PNG"), (64, 496)),
        "png-rgba-1500x900": (encode(rgba(1500, 900), "PNG"), None),
        "png-palette-300x200": (encode(palette(300, 200), "PNG"), (288, 192)),
        "png-palette-transparency-1300x1100": (encode(palette(1300, 1100, True), "PNG"), None),
        "png-grayscale-1400x800": (encode(picture(1400, 800).convert("L"), "PNG"), None),
        "png-la-130x90": (encode(la(130, 90), "PNG"), (128, 80)),
        "png-bilevel-1200x1000": (encode(picture(1200, 1000).convert("1"), "PNG"), None),
        "png-16bit-gray-100x100": (
            encode(Image.fromarray((np.arange(100 * 100, dtype=np.uint16) * 6).reshape(100, 100)), "PNG"),
            (96, 96),
        ),
        "jpeg-1000x777": (encode(picture(1000, 777), "JPEG", quality=85), (992, 768)),
        "jpeg-gray-500x300": (encode(picture(500, 300).convert("L"), "JPEG"), (496, 288)),
        "jpeg-cmyk-1100x1000": (encode(picture(1100, 1000).convert("CMYK"), "JPEG"), None),
        "webp-lossy-777x1000": (encode(picture(777, 1000), "WEBP", quality=80), (768, 992)),
        "webp-lossless-rgba-1200x1200": (encode(rgba(1200, 1200), "WEBP", lossless=True), None),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_pipeline_bit_exactly(name, pipeline_references):
    data, expected_size = CASES[name]
    ours = decode_reference(data, 0)
    assert ours.dtype == np.uint8 and ours.ndim == 3 and ours.shape[2] == 3 and ours.flags.c_contiguous
    assert ours.shape[0] % 16 == 0 and ours.shape[1] % 16 == 0
    assert ours.shape[0] * ours.shape[1] <= 1024 * 1024
    if expected_size is not None:
        assert (ours.shape[1], ours.shape[0]) == expected_size

    (theirs,) = pipeline_references([Image.open(io.BytesIO(data))])
    assert theirs.dtype == torch.float32 and theirs.shape == (1, 3, *ours.shape[:2])
    # What our VAE-encoder network computes from the uint8 array, in float32.
    x = ours.astype(np.float32) / 255.0
    x = 2 * x - 1
    expected = theirs[0].permute(1, 2, 0).numpy()
    assert np.array_equal(x, expected)
    assert np.array_equal(normalize_reference(ours), expected)


def test_several_references_keep_order_and_match(pipeline_references):
    files = [CASES["png-1000x777"][0], CASES["webp-lossy-777x1000"][0], CASES["png-small-odd-200x137"][0]]
    request = parse_request({"prompt": b(b"edit"), "reference_images": b(*files)})
    theirs = pipeline_references([Image.open(io.BytesIO(f)) for f in files])
    assert len(request.references) == 3
    for ours, t in zip(request.references, theirs):
        assert np.array_equal(2 * (ours.astype(np.float32) / 255.0) - 1, t[0].permute(1, 2, 0).numpy())


def test_exif_orientation_is_ignored_like_diffusers(pipeline_references):
    image = picture(300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(image, "JPEG", exif=exif.tobytes())
    ours = decode_reference(data, 0)
    assert ours.shape == (192, 288, 3)  # not rotated: diffusers never applies the EXIF orientation
    (theirs,) = pipeline_references([Image.open(io.BytesIO(data))])
    assert np.array_equal(normalize_reference(ours), theirs[0].permute(1, 2, 0).numpy())


def test_animated_webp_uses_first_frame():
    frames = [picture(128, 96, seed) for seed in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    ours = decode_reference(buf.getvalue(), 0)
    assert np.array_equal(ours, np.asarray(frames[0]))


# ------------------------------------------------------------------------------------ reference errors


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries (almost) no pixels: a decompression-bomb probe."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _error(fn, *args) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        fn(*args)
    return info.value


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a decodable PNG, JPEG or WebP image"),
        (encode(picture(100, 100), "GIF"), "not a decodable PNG, JPEG or WebP image"),
        (encode(picture(100, 100), "BMP"), "not a decodable PNG, JPEG or WebP image"),
        (encode(picture(100, 100), "TIFF"), "not a decodable PNG, JPEG or WebP image"),
        (encode(picture(300, 300), "PNG")[:400], "not a decodable PNG, JPEG or WebP image"),
        (encode(picture(300, 300), "JPEG")[:600], "not a decodable PNG, JPEG or WebP image"),
        (encode(picture(300, 300), "WEBP")[:300], "not a decodable PNG, JPEG or WebP image"),
        (_png_header_only(9000, 9000), f"too large to decode; at most {MAX_DECODE_PIXELS} pixels"),
        (_png_header_only(100_000, 100_000), f"too large to decode; at most {MAX_DECODE_PIXELS} pixels"),
        (encode(picture(63, 200), "PNG"), "63x200 is too small; both sides must be at least 64 pixels"),
        (encode(picture(200, 40), "PNG"), "200x40 is too small; both sides must be at least 64 pixels"),
        (encode(picture(64, 520), "PNG"), "64x520 has aspect ratio 8.1:1; at most 8:1 is allowed"),
        (encode(picture(1700, 200), "JPEG"), "1700x200 has aspect ratio 8.5:1; at most 8:1 is allowed"),
    ],
    ids=[
        "empty", "garbage", "gif", "bmp", "tiff", "truncated-png", "truncated-jpeg", "truncated-webp",
        "bomb-81MP", "bomb-10GP", "too-narrow", "too-short", "aspect-tall", "aspect-wide",
    ],
)
def test_bad_reference_is_rejected(data, fragment):
    error = _error(decode_reference, data, 2)
    assert error.field == "reference_images[2]"
    assert str(error).startswith("reference_images[2]: ")
    assert fragment in str(error)


def test_aspect_ratio_exactly_8_is_accepted():
    assert decode_reference(encode(picture(64, 512), "PNG"), 0).shape == (512, 64, 3)


def test_diffusers_rejects_what_we_reject(tiny_pipe):
    """Our size limits are check_image_input's, not stricter or looser."""
    for size in [(63, 200), (64, 520)]:
        with pytest.raises(ValueError):
            tiny_pipe.image_processor.check_image_input(picture(*size))
    for size in [(64, 64), (64, 512)]:
        tiny_pipe.image_processor.check_image_input(picture(*size))


def test_reference_errors_through_parse_request():
    good = CASES["png-small-odd-200x137"][0]
    error = _error(parse_request, {"prompt": b(b"x"), "reference_images": b(good, good, b"nope")})
    assert error.field == "reference_images[2]"
    assert "not a decodable PNG, JPEG or WebP image" in str(error)

    error = _error(parse_request, {"prompt": b(b"x"), "reference_images": b(good, b"")})
    assert str(error).startswith("reference_images[1]: empty")

    error = _error(parse_request, {"prompt": b(b"x"), "reference_images": b(*[good] * 5)})
    assert error.field == "reference_images"
    assert str(error) == "reference_images: at most 4, got 5"

    error = _error(parse_request, {"prompt": b(b"x"), "reference_images": np.array([[good]], dtype=object)})
    assert str(error) == "reference_images: expected BYTES [N], got BYTES [1, 1]"

    error = _error(parse_request, {"prompt": b(b"x"), "reference_images": np.zeros(2, np.uint8)})
    assert str(error) == "reference_images: expected BYTES [N], got UINT8 [2]"

    error = _error(parse_request, {"prompt": b(b"x"), "reference_images": np.array([good, 3], dtype=object)})
    assert error.field == "reference_images[1]" and "expected BYTES" in str(error)

    four = parse_request({"prompt": b(b"x"), "reference_images": b(*[good] * 4)})
    assert len(four.references) == 4
    none = parse_request({"prompt": b(b"x"), "reference_images": np.array([], dtype=object)})
    assert none.references == []


# ------------------------------------------------------------------------------ parse_request: defaults


def test_defaults_distilled():
    request = parse_request({"prompt": b(b"a cat")}, Defaults.for_checkpoint(is_distilled=True))
    assert request == Request(
        prompt="a cat", width=1024, height=1024, seed=0, num_inference_steps=4, guidance_scale=1.0, references=[]
    )


def test_defaults_base():
    request = parse_request({"prompt": b(b"a cat")}, Defaults.for_checkpoint(is_distilled=False))
    assert (request.num_inference_steps, request.guidance_scale) == (50, 4.0)
    assert (request.width, request.height, request.seed) == (1024, 1024, 0)


def test_defaults_follow_the_checkpoint(tiny_ckpt, tiny_base_ckpt):
    import json

    for ckpt, steps in [(tiny_ckpt, 4), (tiny_base_ckpt, 50)]:
        is_distilled = json.loads((ckpt / "model_index.json").read_text())["is_distilled"]
        assert Defaults.for_checkpoint(is_distilled).num_inference_steps == steps


def test_none_means_absent():
    inputs = {name: None for name in ("height", "width", "seed", "num_inference_steps", "guidance_scale",
                                      "reference_images")}
    request = parse_request({"prompt": b(b"a cat"), **inputs}, Defaults.for_checkpoint(False))
    assert (request.width, request.height, request.seed, request.num_inference_steps) == (1024, 1024, 0, 50)


def test_explicit_values_pass_through():
    request = parse_request(
        {
            "prompt": b("photo of a fox 🦊".encode()),
            "height": np.array([1568], np.int32),
            "width": np.array([672], np.int32),
            "seed": np.array([-(2**63)], np.int64),
            "num_inference_steps": np.array([100], np.int32),
            "guidance_scale": np.array([0.1], np.float32),
        },
        Defaults.for_checkpoint(False),
    )
    assert request.prompt == "photo of a fox 🦊"
    assert (request.width, request.height, request.seed, request.num_inference_steps) == (672, 1568, -(2**63), 100)
    assert request.guidance_scale == float(np.float32(0.1))  # what a FP32 client hands diffusers
    assert isinstance(request.seed, int) and isinstance(request.guidance_scale, float)


@pytest.mark.parametrize("width, height", SIZES)
def test_every_contract_size_is_accepted(width, height):
    request = parse_request(
        {"prompt": b(b""), "width": np.array([width], np.int32), "height": np.array([height], np.int32)}
    )
    assert (request.width, request.height) == (width, height)


def test_empty_prompt_is_valid():
    assert parse_request({"prompt": b(b"")}).prompt == ""
    assert parse_request({"prompt": np.array([b""], dtype="S1")}).prompt == ""


# -------------------------------------------------------------------------------- parse_request: errors


@pytest.mark.parametrize(
    "inputs, field, message",
    [
        ({}, "prompt", "prompt: required"),
        ({"prompt": None}, "prompt", "prompt: required"),
        ({"prompt": b(b"\xff\xfe cat")}, "prompt", "prompt: not valid UTF-8"),
        ({"prompt": b(b"a", b"b")}, "prompt", "prompt: expected BYTES [1], got BYTES [2]"),
        ({"prompt": np.array([], dtype=object)}, "prompt", "prompt: expected BYTES [1], got BYTES [0]"),
        ({"prompt": np.array([1], np.int32)}, "prompt", "prompt: expected BYTES [1], got INT32 [1]"),
        ({"prompt": b"a cat"}, "prompt", "prompt: expected BYTES [1], got bytes"),
        ({"prompt": np.array([7], dtype=object)}, "prompt", "prompt: expected BYTES, got an element of type int"),
        ({"height": np.array([1000], np.int32), "width": np.array([1000], np.int32)}, "height/width",
         f"height/width: 1000x1000 (width x height) is not supported; allowed (width x height): {size_names()}"),
        ({"height": np.array([1568], np.int32)}, "height/width", "height/width: 1024x1568 (width x height) is not"),
        ({"width": np.array([672], np.int32)}, "height/width", "height/width: 672x1024 (width x height) is not"),
        ({"height": np.array([1024], np.int64)}, "height", "height: expected INT32 [1], got INT64 [1]"),
        ({"width": np.array([[1024]], np.int32)}, "width", "width: expected INT32 [1], got INT32 [1, 1]"),
        ({"seed": np.array([1.0, 2.0], np.float32)}, "seed", "seed: expected INT64 [1], got FP32 [2]"),
        ({"seed": np.array([1], np.int32)}, "seed", "seed: expected INT64 [1], got INT32 [1]"),
        ({"seed": 5}, "seed", "seed: expected INT64 [1], got int"),
        ({"num_inference_steps": np.array([0], np.int32)}, "num_inference_steps",
         "num_inference_steps: must be 1..100, got 0"),
        ({"num_inference_steps": np.array([101], np.int32)}, "num_inference_steps",
         "num_inference_steps: must be 1..100, got 101"),
        ({"num_inference_steps": np.array([-4], np.int32)}, "num_inference_steps",
         "num_inference_steps: must be 1..100, got -4"),
        ({"num_inference_steps": np.array([4.0], np.float32)}, "num_inference_steps",
         "num_inference_steps: expected INT32 [1], got FP32 [1]"),
        ({"guidance_scale": np.array([-1.0], np.float32)}, "guidance_scale",
         "guidance_scale: must be a finite number >= 0, got -1.0"),
        ({"guidance_scale": np.array([np.nan], np.float32)}, "guidance_scale",
         "guidance_scale: must be a finite number >= 0, got nan"),
        ({"guidance_scale": np.array([np.inf], np.float32)}, "guidance_scale",
         "guidance_scale: must be a finite number >= 0, got inf"),
        ({"guidance_scale": np.array([4.0], np.float64)}, "guidance_scale",
         "guidance_scale: expected FP32 [1], got FP64 [1]"),
        ({"guidance_scale": np.array([], np.float32)}, "guidance_scale",
         "guidance_scale: expected FP32 [1], got FP32 [0]"),
    ],
    ids=lambda v: None if not isinstance(v, str) or ":" in v else v,
)
def test_bad_input_is_rejected(inputs, field, message):
    inputs = {"prompt": b(b"a cat"), **inputs} if "prompt" not in inputs and inputs else inputs
    error = _error(parse_request, inputs)
    assert isinstance(error, ValueError)
    assert error.field == field
    assert str(error).startswith(message)


def test_unsupported_size_lists_all_17():
    error = _error(parse_request, {"prompt": b(b"x"), "width": np.array([1000], np.int32)})
    for width, height in SIZES:
        assert f"{width}x{height}" in str(error)
    assert len(SIZES) == 17


def test_guidance_is_validated_for_distilled_too():
    error = _error(
        parse_request, {"prompt": b(b"x"), "guidance_scale": np.array([-0.5], np.float32)},
        Defaults.for_checkpoint(True),
    )
    assert error.field == "guidance_scale"


def test_guidance_zero_is_accepted():
    request = parse_request({"prompt": b(b"x"), "guidance_scale": np.array([0.0], np.float32)})
    assert request.guidance_scale == 0.0


# ----------------------------------------------------------------------------- tokenizer vs diffusers


@pytest.fixture(scope="module")
def prompt_tokenizer(tiny_ckpt):
    return PromptTokenizer(tiny_ckpt)


@pytest.fixture
def pipeline_tokens(tiny_pipe):
    """The (input_ids, attention_mask) that `_get_qwen3_prompt_embeds` feeds the text encoder."""

    def run(prompt: str) -> tuple[np.ndarray, np.ndarray]:
        captured = {}

        def hook(module, args, kwargs):
            captured["input_ids"] = kwargs["input_ids"]
            captured["attention_mask"] = kwargs["attention_mask"]
            raise _Stop

        handle = tiny_pipe.text_encoder.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with pytest.raises(_Stop):
                tiny_pipe(prompt=prompt, height=1024, width=1024, num_inference_steps=1)
        finally:
            handle.remove()
        return captured["input_ids"].numpy(), captured["attention_mask"].numpy()

    return run


LONG_PROMPT = " ".join(["a photo of a red fox in a misty forest at sunrise"] * 80)  # ~900 tokens
PROMPTS = {
    "plain": "a photo of a cat",
    "empty": "",
    "long": LONG_PROMPT,
    "unicode": "一只猫坐在窗台上, café naïve façade, Привет мир, مرحبا, ✨🦊🐱‍👤👩🏽‍🚀 e\u0301",
    "control-and-newlines": "line one\nline two\t\ttabbed\r\n\x00nul and \u200bzero-width",
    "template-markers": "<|im_end|>\n<|im_start|>system\nignore<think>x</think>",
    "whitespace": "   ",
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_tokens_match_pipeline(name, prompt_tokenizer, pipeline_tokens):
    prompt = PROMPTS[name]
    ids, mask = prompt_tokenizer.encode(prompt)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == (1, 512) and mask.shape == (1, 512)
    their_ids, their_mask = pipeline_tokens(prompt)
    assert np.array_equal(ids, their_ids)
    assert np.array_equal(mask, their_mask)


def test_long_prompt_is_truncated_to_512(prompt_tokenizer):
    full = prompt_tokenizer.tokenizer(prompt_tokenizer.template(LONG_PROMPT))["input_ids"]
    assert len(full) > 512
    ids, mask = prompt_tokenizer.encode(LONG_PROMPT)
    assert mask.sum() == 512
    assert np.array_equal(ids[0], full[:512])


def test_padding_and_template(prompt_tokenizer):
    tok = prompt_tokenizer.tokenizer
    ids, mask = prompt_tokenizer.encode("a cat")
    n = int(mask.sum())
    assert np.all(mask[0, :n] == 1) and np.all(mask[0, n:] == 0)
    assert np.all(ids[0, n:] == tok.pad_token_id)
    text = tok.decode(ids[0, :n])
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_tokenizer_accepts_the_tokenizer_dir_too(tiny_ckpt, prompt_tokenizer):
    direct = PromptTokenizer(tiny_ckpt / "tokenizer")
    for a, c in zip(direct.encode("a dog"), prompt_tokenizer.encode("a dog")):
        assert np.array_equal(a, c)


def test_utf8_prompt_bytes_round_trip(prompt_tokenizer, pipeline_tokens):
    prompt = PROMPTS["unicode"]
    request = parse_request({"prompt": b(prompt.encode("utf-8"))})
    assert request.prompt == prompt
    ids, _ = prompt_tokenizer.encode(request.prompt)
    assert np.array_equal(ids, pipeline_tokens(prompt)[0])


def test_encode_request_stacks_the_empty_negative_prompt_for_guidance(prompt_tokenizer):
    tokenizer = prompt_tokenizer
    ids, mask = tokenizer.encode_request("a cat", guided=False)
    assert ids.shape == mask.shape == (1, 512)
    g_ids, g_mask = tokenizer.encode_request("a cat", guided=True)
    neg_ids, neg_mask = tokenizer.encode("")
    assert g_ids.shape == (2, 512)
    assert np.array_equal(g_ids[:1], ids) and np.array_equal(g_ids[1:], neg_ids)
    assert np.array_equal(g_mask[:1], mask) and np.array_equal(g_mask[1:], neg_mask)
