"""Inpainting and image-to-image served: one real tritonserver (tiny checkpoint, one batching sampler that
waits up to a second for company) for all of it. Over gRPC and HTTP, through the gateway's NIM and OpenAI
APIs (the official `openai` client's `images.edit(mask=...)`), each image equals diffusers'
Flux2KleinInpaintPipeline within 2 per channel value; concurrent inpaint requests of one shape share one
denoising loop and each equals itself alone; bad inputs are refused by name and the server keeps serving.
The many parameter combinations are checked without Triton in tests/test_inpaint.py."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from conftest import run_concurrently, serve_one_batching_sampler
from flux2_klein.client.triton_client import Flux2KleinClient, GenerationError
from test_inpaint import PROMPT, _pipeline, mask_of, picture, png

pytestmark = pytest.mark.slow
KEY = "inpaint-key"


@pytest.fixture(scope="module")
def served(tiny_ckpt, onnx_dir, tmp_path_factory):
    server = serve_one_batching_sampler(tiny_ckpt, onnx_dir, tmp_path_factory, "inpaint", padding_mask_crop=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def inpaint_pipe(tiny_ckpt):
    import torch
    from diffusers import Flux2KleinInpaintPipeline

    pipe = Flux2KleinInpaintPipeline.from_pretrained(tiny_ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _close(got, want, what: str) -> None:
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
    print(f"{what}: largest difference {diff.max()}, mean {diff.mean():.4f}")
    assert got.shape == want.shape and diff.max() <= 2, what


def test_inpaint_and_image_to_image_over_grpc_and_http_equal_the_pipeline(served, inpaint_pipe):
    image, mask, reference = picture(1024, 1024, 1), mask_of("ellipse", 1024, 1024), picture(320, 240, 9)
    with Flux2KleinClient(served.grpc_url) as client:
        got = client.generate(PROMPT, seed=3, steps=4, image=png(image), mask=png(mask), strength=0.8,
                              references=[png(reference)])
    want, _ = _pipeline(inpaint_pipe, image, mask, float(np.float32(0.8)), reference, 3)
    _close(got, want, "inpaint with a reference, gRPC")

    image = picture(1248, 832, 2)
    with Flux2KleinClient(served.http_url, protocol="http") as client:
        got = client.generate(PROMPT, seed=-7, steps=4, image=png(image), strength=0.3)
    want, _ = _pipeline(inpaint_pipe, image, Image.new("L", image.size, 255), float(np.float32(0.3)), None, -7)
    _close(got, want, "image-to-image, HTTP")


def test_padding_mask_crop_over_grpc_equals_the_pipeline_and_the_in_process_run(served, inpaint_pipe):
    """The crop around the mask inpainted and pasted back by the postprocess model (this repository is built
    with --padding-mask-crop); DirectPipeline gives the same image bit for bit."""
    from flux2_klein.direct import DirectPipeline

    image, mask = picture(1248, 832, 6), mask_of("rect", 1248, 832)
    with Flux2KleinClient(served.grpc_url) as client:
        got = client.generate(PROMPT, seed=5, steps=4, image=png(image), mask=png(mask), strength=0.8,
                              padding_mask_crop=24)
    want, _ = _pipeline(inpaint_pipe, image, mask, float(np.float32(0.8)), None, 5, padding_mask_crop=24)
    _close(got, want, "padding_mask_crop, gRPC")
    keep = np.asarray(mask) == 0
    assert np.array_equal(got[keep], np.asarray(image)[keep]), "outside the mask: the picture itself"
    direct = DirectPipeline(served.repository).generate(PROMPT, seed=5, steps=4, image=png(image), mask=png(mask),
                                                        strength=0.8, padding_mask_crop=24)
    assert np.array_equal(direct, got)


def test_concurrent_inpaint_requests_share_a_loop_and_each_equals_itself_alone(served):
    image = png(picture(1024, 1024, 4))
    # Strengths 0.6 and 0.7 cut 4 steps alike (the first step kept is 1): one shape, one loop.
    jobs = [dict(seed=s, image=image, mask=png(mask_of(kind, 1024, 1024)), strength=strength)
            for s, kind, strength in ((-7, "rect", 0.6), (0, "blobs", 0.7), (2**63 - 1, "ellipse", 0.7))]

    def run(job):
        with Flux2KleinClient(served.grpc_url) as client:
            return client.generate(f"a fox, batched {job['seed']}", steps=4, **job)

    together, sampler, dit = run_concurrently(served, run, jobs)
    assert sampler == [3, 1], "three inpaint requests, one denoising loop"
    assert dit == [3, 3], "strength's cut leaves 3 of 4 steps: one DiT call each for the three"
    for i, job in enumerate(jobs):
        alone = run(job)
        diff = np.abs(together[i].astype(int) - alone.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01, f"request {i}: {diff.max()}"


BAD = [  # (kwargs of generate, the field the message starts with, what it says)
    (dict(image="picture", mask="small mask"), "mask_image", "not init_image's size"),
    (dict(image="picture", mask=b"not an image"), "mask_image", "not a decodable"),
    (dict(image="picture", strength=1.5), "strength", "0..1"),
    (dict(image="picture", strength=0.0), "strength", "leaves no denoising step"),
    (dict(mask="mask"), "mask_image", "needs `init_image`"),
    (dict(image="picture", padding_mask_crop=8), "padding_mask_crop", "needs `mask_image`"),
    (dict(image="picture", mask="black mask", padding_mask_crop=8), "padding_mask_crop", "black everywhere"),
]


def test_bad_inpaint_inputs_are_refused_by_name_and_the_server_keeps_serving(served):
    files = {"picture": png(picture(1024, 1024, 0)), "small mask": png(Image.new("L", (512, 512), 255)),
             "mask": png(Image.new("L", (1024, 1024), 255)), "black mask": png(Image.new("L", (1024, 1024), 0))}
    with Flux2KleinClient(served.grpc_url) as client:
        for kwargs, field, says in BAD:
            kwargs = {k: files.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
            with pytest.raises(GenerationError) as caught:
                client.generate("x", steps=1, **kwargs)
            assert caught.value.invalid_argument and f"{field}: " in caught.value.message, caught.value.message
            assert says in caught.value.message, caught.value.message
        assert client.generate("x", steps=1, image=files["picture"], strength=1.0).shape == (1024, 1024, 3)


# -------------------------------------------------------------------------------------------------- gateway


@pytest.fixture(scope="module")
def gateway(served):
    from test_gateway import InProcessGateway

    gw = InProcessGateway(triton_url=served.grpc_url, api_key=KEY, timeout_s=300)
    yield gw
    gw.stop()


def test_openai_edit_with_a_mask_and_nim_inpaint_equal_the_pipeline(gateway, served, inpaint_pipe):
    openai = pytest.importorskip("openai")
    from test_gateway import http_request

    image, mask = picture(1248, 832, 6), mask_of("rect", 1248, 832)
    # OpenAI's convention: fully transparent pixels mark where to edit.
    rgba = np.zeros((832, 1248, 4), np.uint8)
    rgba[..., 3] = np.where(np.asarray(mask) >= 128, 0, 255)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=KEY, max_retries=0, timeout=300)
    result = client.images.edit(prompt=PROMPT, image=("a.png", png(image), "image/png"),
                                mask=("m.png", png(Image.fromarray(rgba, "RGBA")), "image/png"),
                                extra_body={"seed": 5, "steps": 4, "strength": 0.8})
    assert result.size == "1248x832"
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))
    want, _ = _pipeline(inpaint_pipe, image, mask, float(np.float32(0.8)), None, 5)
    _close(got, want, "OpenAI images.edit with a mask")

    answer = http_request(gateway.port, "POST", "/v1/infer", {
        "prompt": PROMPT, "mode": "inpaint", "seed": 5, "steps": 4, "strength": 0.8,
        "image": [base64.b64encode(png(image)).decode()], "mask_image": base64.b64encode(png(mask)).decode()},
        headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status == 200, answer
    nim = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["artifacts"][0]["base64"]))))
    assert np.array_equal(nim, got)

    for body, says in [({"mode": "base", "mask_image": "AAAA"}, "mask_image: only with mode 'inpaint'"),
                       ({"mode": "inpaint"}, "image: mode 'inpaint' needs"),
                       ({"mode": "inpaint", "image": [base64.b64encode(png(image)).decode()], "strength": 0},
                        "strength: 0.0 leaves no denoising step")]:
        answer = http_request(gateway.port, "POST", "/v1/infer", {"prompt": "x", "steps": 1, **body},
                              headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status == 422 and answer.json()["detail"].startswith(says), answer.json()
    with pytest.raises(openai.BadRequestError) as caught:  # a mask of another size
        client.images.edit(prompt="x", image=("a.png", png(image), "image/png"),
                           mask=("m.png", png(Image.new("RGBA", (64, 64))), "image/png"))
    assert caught.value.body["param"] == "mask" and "first image's size" in caught.value.body["message"]


def test_nim_padding_mask_crop_equals_triton_and_is_refused_outside_inpaint(gateway, served):
    from test_gateway import http_request

    image, mask = picture(1024, 1024, 3), mask_of("rect", 1024, 1024)
    with Flux2KleinClient(served.grpc_url) as client:
        want = client.generate(PROMPT, seed=9, steps=2, image=png(image), mask=png(mask), strength=0.8,
                               padding_mask_crop=16)
    headers = {"Authorization": f"Bearer {KEY}"}
    answer = http_request(gateway.port, "POST", "/v1/infer", {
        "prompt": PROMPT, "mode": "inpaint", "seed": 9, "steps": 2, "strength": 0.8, "padding_mask_crop": 16,
        "image": [base64.b64encode(png(image)).decode()], "mask_image": base64.b64encode(png(mask)).decode()},
        headers=headers)
    assert answer.status == 200, answer
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["artifacts"][0]["base64"]))))
    assert np.array_equal(got, want)
    answer = http_request(gateway.port, "POST", "/v1/infer", {"prompt": "x", "steps": 1, "padding_mask_crop": 8},
                          headers=headers)
    assert answer.status == 422 and answer.json()["detail"].startswith("padding_mask_crop: only with mode 'inpaint'")
