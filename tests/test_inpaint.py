"""Inpainting and image-to-image against diffusers' own Flux2KleinInpaintPipeline (v0.42.1), on the tiny
checkpoint: the strength cut, the mask's binarization and token mask, and the whole loop (request.py's
decoding and resizing, sampling.py's loop) equal to the pipeline's latents bit for bit and its picture
within 2 per channel value, for masks of several shapes, strengths 0.3/0.8/1.0, with and without a reference,
at two sizes. Triton and the gateway: tests/test_inpaint_serving.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from flux2_klein import sampling
from flux2_klein.contract import strength_steps
from flux2_klein.request import InvalidInput, parse_request
from flux2_klein.sampling import Job, sample, sample_batch
from flux2_klein.sizes import latent_grid
from flux2_klein.tiny import SCHEDULER_CONFIG
from test_sampling import PROMPT, TorchTransformer, _ckpt_scheduler_config, _decode, _diffusers_schedule

MAX_PIXEL_DIFF = 2


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_ckpt):
    from diffusers import Flux2KleinInpaintPipeline

    pipe = Flux2KleinInpaintPipeline.from_pretrained(tiny_ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour ramps and noise: a picture whose VAE latents are not flat."""
    rng = np.random.default_rng(abs(seed))
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = 255 * (0.5 * x * np.array([1.0, 0.3, 0.6]) + 0.5 * y * np.array([0.2, 0.9, 0.4]))
    return Image.fromarray(np.clip(base + rng.integers(0, 50, (height, width, 3)), 0, 255).astype(np.uint8))


def mask_of(kind: str, width: int, height: int) -> Image.Image:
    """Masks of several shapes and modes: a rectangle (L), a soft ellipse (grey edges the binarization
    decides), scattered blobs on an RGBA image (alpha ignored, as the pipeline's grayscale conversion does)."""
    if kind == "rect":
        m = Image.new("L", (width, height), 0)
        ImageDraw.Draw(m).rectangle((width // 4, height // 5, width // 2 + 37, height // 2 + 11), fill=255)
        return m
    if kind == "ellipse":
        yy, xx = np.mgrid[0:height, 0:width]
        r = np.hypot((xx - 0.6 * width) / (0.3 * width), (yy - 0.45 * height) / (0.25 * height))
        return Image.fromarray(np.clip(255 * (1.5 - r), 0, 255).astype(np.uint8))  # a ramp across 0.5
    if kind == "blobs":
        m = Image.new("RGBA", (width, height), (0, 0, 0, 255))
        d = ImageDraw.Draw(m)
        rng = np.random.default_rng(3)
        for _ in range(6):
            x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(30, 160))
            d.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 255, int(rng.integers(0, 256))))
        return m
    raise ValueError(kind)


def _bytes_input(data: bytes) -> np.ndarray:
    one = np.empty([1], dtype=np.object_)
    one[0] = data
    return one


def _request(image: bytes, mask: bytes | None = None, strength: float | None = None, references=(),
             steps: int = 4, size=None, **extra):
    inputs = {"prompt": _bytes_input(PROMPT.encode()), "init_image": _bytes_input(image),
              "num_inference_steps": np.array([steps], np.int32), **extra}
    if mask is not None:
        inputs["mask_image"] = _bytes_input(mask)
    if strength is not None:
        inputs["strength"] = np.array([strength], np.float32)
    if references:
        refs = np.empty([len(references)], dtype=np.object_)
        refs[:] = list(references)
        inputs["reference_images"] = refs
    if size is not None:
        inputs["width"], inputs["height"] = np.array([size[0]], np.int32), np.array([size[1]], np.int32)
    return parse_request(inputs)


def _tokens(pipe, pixels: np.ndarray) -> torch.Tensor:
    """The pipeline's own VAE encoding of a uint8 picture: image_processor.preprocess's tensor (its memory
    layout too: the CPU convolution's rounding depends on it), then _encode_vae_image and packing (what the
    served vae_encoder computes)."""
    height, width = pixels.shape[:2]
    x = pipe.image_processor.preprocess(Image.fromarray(pixels), height, width)
    with torch.no_grad():
        latents = pipe._encode_vae_image(x, generator=None)
    return pipe._pack_latents(latents)[0]


def _pipeline(pipe, image, mask, strength, reference, seed, steps=4, **extra):
    """The oracle's picture and final packed latents [h*w, C]."""
    final = {}

    def grab(_pipe, i, t, kwargs):
        final["latents"] = kwargs["latents"][0].clone()
        return {}

    out = pipe(prompt=PROMPT, image=image, mask_image=mask, image_reference=reference, strength=strength,
               num_inference_steps=steps, guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(seed),
               callback_on_step_end=grab, **extra).images[0]
    return np.asarray(out), final["latents"].numpy()


def _ours(pipe, ckpt, req, seed):
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(PROMPT, device="cpu")
    refs = [_tokens(pipe, r) for r in req.references]
    grids = [latent_grid(r.shape[1], r.shape[0]) for r in req.references]
    mask = None if req.mask is None else sampling.mask_tokens(req.mask)
    latents = sample(TorchTransformer(pipe.transformer), embeds, width=req.width, height=req.height, seed=seed,
                     num_steps=req.num_inference_steps, scheduler_config=_ckpt_scheduler_config(ckpt),
                     channels=pipe.transformer.config.in_channels, references=refs, reference_grids=grids,
                     image=_tokens(pipe, req.image), mask=mask, start_step=req.start_step)
    return latents


# ------------------------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize("steps", [1, 2, 4, 28, 50])
def test_strength_cut_equals_the_pipelines(inpaint_pipe, tiny_ckpt, steps):
    """Every strength's first step and step count, from the float32 values a client sends."""
    for strength in (0.0, 1e-9, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 0.8, 0.99, 1.0):
        strength = float(np.float32(strength))
        inpaint_pipe.scheduler = _diffusers_schedule(_ckpt_scheduler_config(tiny_ckpt), 1024, 1024, steps)
        timesteps, run = inpaint_pipe.get_timesteps(steps, strength, "cpu")
        start, ours = strength_steps(steps, strength)
        assert (start, ours) == (inpaint_pipe.scheduler.begin_index, run), (steps, strength)
        assert torch.equal(timesteps, inpaint_pipe.scheduler.timesteps[start:])


@pytest.mark.parametrize("kind", ["rect", "ellipse", "blobs"])
def test_mask_binarization_and_token_mask_equal_the_pipelines(inpaint_pipe, kind):
    width, height = 1248, 832
    mask = mask_of(kind, width, height)
    req = _request(png(picture(width, height, 0)), png(mask))
    theirs = inpaint_pipe.mask_processor.preprocess(mask, height=height, width=width)
    assert np.array_equal(req.mask, theirs[0, 0].numpy())
    assert 0 < req.mask.mean() < 1
    packed = inpaint_pipe.prepare_mask_latents(theirs, 1, 1, height, width, torch.float32, "cpu")
    assert torch.equal(sampling.mask_tokens(req.mask), packed[0])


def test_bad_inpaint_inputs_are_refused_by_name():
    image = png(picture(1024, 1024, 0))
    cases = [
        (dict(mask=png(Image.new("L", (1000, 1024), 255))), "mask_image", "not init_image's size"),
        (dict(mask=b"not a png"), "mask_image", "not a decodable"),
        (dict(strength=1.5), "strength", "0..1"),
        (dict(strength=float("nan")), "strength", "0..1"),
        (dict(strength=0.0), "strength", "leaves no denoising step"),
        (dict(padding_mask_crop=np.array([8], np.int32)), "padding_mask_crop", "needs `mask_image`"),
        (dict(mask=png(Image.new("L", (1024, 1024), 255)), padding_mask_crop=np.array([-1], np.int32)),
         "padding_mask_crop", "must be >= 0"),
        (dict(mask=png(Image.new("L", (1024, 1024), 0)), padding_mask_crop=np.array([8], np.int32)),
         "padding_mask_crop", "black everywhere"),
        (dict(references=[png(picture(64, 64, i)) for i in range(4)]), "reference_images", "at most 3"),
    ]
    for kwargs, field, says in cases:
        with pytest.raises(InvalidInput) as caught:
            _request(image, **kwargs)
        assert caught.value.field == field and says in str(caught.value), (kwargs, str(caught.value))
    with pytest.raises(InvalidInput, match="^padding_mask_crop: not served by this repository"):
        parse_request({"prompt": _bytes_input(b"x"), "init_image": _bytes_input(image),
                       "mask_image": _bytes_input(image), "padding_mask_crop": np.array([8], np.int32)},
                      crop_served=False)
    with pytest.raises(InvalidInput, match="^init_image: not a decodable"):
        _request(b"garbage")
    for name, value in (("mask_image", _bytes_input(image)), ("strength", np.array([0.5], np.float32))):
        with pytest.raises(InvalidInput, match=f"^{name}: needs `init_image`"):
            parse_request({"prompt": _bytes_input(b"x"), name: value})


def test_size_follows_the_picture_or_the_request():
    assert (_request(png(picture(1200, 800, 0))).width, _request(png(picture(1200, 800, 0))).height) == (1248, 832)
    req = _request(png(picture(1200, 800, 0)), png(Image.new("L", (1200, 800), 255)), size=(1024, 1024))
    assert req.image.shape == (1024, 1024, 3) and req.mask.shape == (1024, 1024) and req.mask.min() == 1


# ------------------------------------------------------------------------------------------- end to end

# (size, mask kind or None for image-to-image, strength, with a reference, seed)
CASES = [
    ((1024, 1024), "rect", 0.8, False, 3),
    ((1024, 1024), "ellipse", 0.3, True, -7),
    ((1248, 832), None, 1.0, False, 11),
    ((1248, 832), "blobs", 0.8, True, 5),
    ((1248, 832), "rect", 0.3, False, 0),
]


@pytest.mark.parametrize("size, kind, strength, with_reference, seed", CASES,
                         ids=[f"{c[0][0]}x{c[0][1]}-{c[1] or 'img2img'}-{c[2]}-{'ref' if c[3] else 'noref'}"
                              for c in CASES])
def test_whole_inpaint_equals_the_pipeline(inpaint_pipe, tiny_ckpt, size, kind, strength, with_reference, seed):
    width, height = size
    image = picture(width, height, seed)
    mask = None if kind is None else mask_of(kind, width, height)
    reference = picture(320, 240, 9) if with_reference else None
    req = _request(png(image), None if mask is None else png(mask), strength,
                   references=[png(reference)] if reference is not None else ())
    assert (req.width, req.height) == size
    # Image-to-image is the pipeline with an all-white mask (it requires a mask).
    want_image, want_latents = _pipeline(inpaint_pipe, image, mask if mask is not None else
                                         Image.new("L", size, 255), float(np.float32(strength)), reference, seed)
    latents = _ours(inpaint_pipe, tiny_ckpt, req, seed)
    rows, cols = latent_grid(width, height)
    latent_diff = float(np.abs(latents.numpy().reshape(rows * cols, -1) - want_latents).max())
    pixel_diff = int(np.abs(np.asarray(_decode(inpaint_pipe, latents), np.int16) - want_image).max())
    print(f"\n{size} {kind} {strength} ref={with_reference}: latent diff {latent_diff}, pixel diff {pixel_diff}")
    assert latent_diff == 0.0
    assert pixel_diff <= MAX_PIXEL_DIFF
    if kind is not None:  # the kept part is the picture's own latents (clean after the last step)
        keep = req.mask.reshape(rows, 16, cols, 16).max(axis=(1, 3)).reshape(-1) == 0
        assert np.array_equal(latents.numpy().reshape(rows * cols, -1)[keep],
                              _tokens(inpaint_pipe, req.image).numpy()[keep])


def test_a_picture_of_another_size_is_resized_to_the_served_size_first(inpaint_pipe, tiny_ckpt):
    """900x880 is served at 1024x1024 (the nearest aspect ratio): the picture and its mask are resized to it
    first; the result is the pipeline's for the resized picture (the pipeline resizes the mask itself)."""
    image, mask = picture(900, 880, 4), mask_of("ellipse", 900, 880)
    req = _request(png(image), png(mask), 0.8)
    assert (req.width, req.height) == (1024, 1024)
    want_image, want_latents = _pipeline(inpaint_pipe, image.resize((1024, 1024), Image.Resampling.LANCZOS), mask,
                                         float(np.float32(0.8)), None, 2)
    latents = _ours(inpaint_pipe, tiny_ckpt, req, 2)
    assert float(np.abs(latents.numpy().reshape(64 * 64, -1) - want_latents).max()) == 0.0
    assert int(np.abs(np.asarray(_decode(inpaint_pipe, latents), np.int16) - want_image).max()) <= MAX_PIXEL_DIFF


# ---------------------------------------------------------------------------------------------- batching


def test_inpaint_jobs_of_one_shape_share_a_loop_and_each_equals_itself_alone(tiny_ckpt):
    from test_batching import TinyDit

    dit = TinyDit(tiny_ckpt)
    rng = np.random.default_rng(0)
    n_noise = 64 * 64
    jobs = []
    for i, seed in enumerate((-7, 0, 2**63 - 1)):
        mask = None if i == 2 else (rng.random((1024, 1024)) < 0.5).astype(np.float32)  # the last: no mask
        jobs.append(Job(rng.standard_normal((1, 512, 48), dtype=np.float32), seed, references=[
            rng.standard_normal((12, 32), dtype=np.float32)], image=rng.standard_normal((n_noise, 32), dtype=np.float32),
            mask=None if mask is None else sampling.mask_tokens(mask)))
    kw = dict(width=1024, height=1024, num_steps=4, scheduler_config=SCHEDULER_CONFIG, channels=32,
              reference_grids=[(3, 4)], start_step=2)
    together = sample_batch(dit, jobs, **kw)
    assert dit.batches == [3, 3]  # strength's cut: two of the four steps, one DiT call each for all three
    for job, got in zip(jobs, together):
        alone = sample(dit, job.prompt_embeds, seed=job.seed, references=job.references, image=job.image,
                       mask=job.mask, **kw)
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-3)  # the DiT's GEMMs see more rows
        assert float((got - alone).abs().mean()) < 1e-5
    with pytest.raises(ValueError, match="need start_step"):
        sample_batch(dit, jobs, **{**kw, "start_step": None})


# ---------------------------------------------------------------------------------------- padding_mask_crop


def test_crop_pieces_equal_the_processors(inpaint_pipe):
    """mask_crop's box, fill resize and paste back against diffusers' own functions, on random boxes, pads,
    sizes and modes (a soft mask, an RGBA picture with varying alpha, a palette picture)."""
    from diffusers.image_processor import VaeImageProcessor

    from flux2_klein import mask_crop

    proc = inpaint_pipe.image_processor  # Flux2ImageProcessor: its centre crop in apply_overlay
    rng = np.random.default_rng(1)
    for trial in range(120):
        w, h = int(rng.integers(40, 260)), int(rng.integers(40, 260))
        m = np.zeros((h, w), np.uint8)
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = int(rng.integers(x0, w)) + 1, int(rng.integers(y0, h)) + 1
        m[y0:y1, x0:x1] = rng.integers(1, 256, (y1 - y0, x1 - x0))
        mask = Image.fromarray(m, "L")
        pad, (tw, th) = int(rng.integers(0, 48)), [(1024, 1024), (1248, 832), (832, 1248), (1568, 672)][trial % 4]
        box = mask_crop.crop_region(mask, tw, th, pad)
        assert box == tuple(VaeImageProcessor.get_crop_region(mask, tw, th, pad=pad)), (w, h, pad, box)
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        pictures = [Image.fromarray(rgb), Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA"),
                    Image.fromarray(rgb).quantize(32)]
        pic = pictures[trial % 3]
        for size in ((96, 64), (64, 96), (80, 80)):
            for part in (pic.crop(box), mask.crop(box)):
                assert np.array_equal(np.asarray(mask_crop.fill_resize(part, *size)),
                                      np.asarray(proc._resize_and_fill(part, *size))), (trial, size, part.mode)
        generated = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(proc.apply_overlay(mask, pic, Image.fromarray(generated), box))
        assert np.array_equal(mask_crop.paste_back(generated, mask_crop.overlay(pic, mask), box), want), trial


CROP_CASES = [  # (size, mask kind, padding_mask_crop, strength, with a reference, seed)
    ((1024, 1024), "rect", 32, 0.8, False, 3),
    ((1248, 832), "ellipse", 0, 1.0, True, -7),
    ((1248, 832), "rect", 64, 0.3, False, 5),
]


@pytest.mark.parametrize("size, kind, pad, strength, with_reference, seed", CROP_CASES,
                         ids=[f"{c[0][0]}x{c[0][1]}-{c[1]}-pad{c[2]}-{c[3]}" for c in CROP_CASES])
def test_padding_mask_crop_equals_the_pipeline(inpaint_pipe, tiny_ckpt, size, kind, pad, strength, with_reference,
                                               seed):
    """The crop's box, the inpaint of the cut picture and the paste back: the pipeline's latents bit for
    bit and its picture (at the picture's size) within 2."""
    from flux2_klein.mask_crop import paste_back

    width, height = size
    image, mask = picture(width, height, seed), mask_of(kind, width, height)
    reference = picture(320, 240, 9) if with_reference else None
    req = _request(png(image), png(mask), strength, references=[png(reference)] if reference is not None else (),
                   padding_mask_crop=np.array([pad], np.int32))
    assert req.crop_box is not None and req.crop_box != (0, 0, width, height), req.crop_box
    want_image, want_latents = _pipeline(inpaint_pipe, image, mask, float(np.float32(strength)), reference, seed,
                                         padding_mask_crop=pad)
    latents = _ours(inpaint_pipe, tiny_ckpt, req, seed)
    rows, cols = latent_grid(width, height)
    assert float(np.abs(latents.numpy().reshape(rows * cols, -1) - want_latents).max()) == 0.0
    got = paste_back(np.asarray(_decode(inpaint_pipe, latents)), req.overlay, req.crop_box)
    assert got.shape == want_image.shape == (height, width, 3)
    diff = int(np.abs(got.astype(np.int16) - want_image).max())
    print(f"\n{size} {kind} pad={pad}: box {req.crop_box}, pixel diff {diff}")
    assert diff <= MAX_PIXEL_DIFF
    keep = np.asarray(mask.convert("L")) == 0  # black: the picture itself, untouched by the crop
    assert np.array_equal(got[keep], np.asarray(image)[keep])
