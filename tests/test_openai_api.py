"""OpenAI's Images API on the gateway, driven by the official `openai` client, unchanged, given only a base URL
and a key, against the real gateway and a real tritonserver on loopback (tiny checkpoint). Each image is
checked against Flux2KleinClient's for the same seed, so the gateway adds nothing to the pixels."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from flux2_klein.client.triton_client import Flux2KleinClient
from test_gateway import InProcessGateway, encoded, http_request, pattern

openai = pytest.importorskip("openai")  # in the test extra; skipped only where it isn't installed
pytestmark = pytest.mark.slow

KEY = "test-openai-key"


@pytest.fixture(scope="module")
def gateway(triton_server):
    gw = InProcessGateway(triton_url=triton_server.grpc_url, api_key=KEY, timeout_s=300)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def client(gateway):
    # max_retries=0: a 429 or 5xx must show, not be retried away.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key=KEY, max_retries=0, timeout=300)


def pixels(b64_json: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64_json)))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def test_generate_n_images_each_equal_to_its_seed(client, triton_server):
    """n=2 with seed 5 (an extension, via extra_body): image i equals the single Triton request with seed 5 + i."""
    result = client.images.generate(prompt="a red fox, openai", n=2, size="1024x1024", response_format="b64_json",
                                    extra_body={"seed": 5, "steps": 1})
    assert isinstance(result.created, int) and len(result.data) == 2
    assert result.output_format == "png" and result.size == "1024x1024"
    with Flux2KleinClient(triton_server.grpc_url) as triton:
        for i, item in enumerate(result.data):
            assert item.model_extra["seed"] == 5 + i
            assert np.array_equal(pixels(item.b64_json), triton.generate("a red fox, openai", seed=5 + i, steps=1))


def test_edit_with_two_images_keeps_the_first_ones_shape(client, triton_server):
    """Multipart with two `image` files and no size: the answer has the size nearest the first image's aspect
    ratio (1200x800 -> 1248x832), chosen by the Triton model itself -- a gRPC request without a size gets the
    same image."""
    refs = [encoded(pattern(1200, 800, 0), "PNG"), encoded(pattern(300, 500, 1), "JPEG", quality=90)]
    result = client.images.edit(prompt="make it winter", image=[("a.png", refs[0], "image/png"),
                                                                ("b.jpg", refs[1], "image/jpeg")],
                                extra_body={"seed": 3, "steps": 1})
    assert len(result.data) == 1 and result.size == "1248x832"
    got = pixels(result.data[0].b64_json)
    assert got.shape == (832, 1248, 3)
    with Flux2KleinClient(triton_server.grpc_url) as triton:
        assert np.array_equal(got, triton.generate("make it winter", seed=3, steps=1, references=refs))


def test_edit_with_one_image_as_jpeg(client, triton_server):
    ref = encoded(pattern(512, 512, 2), "PNG")
    result = client.images.edit(prompt="a cat", image=("cat.png", ref, "image/png"), size="832x1248",
                                output_format="jpeg", extra_body={"seed": 9, "steps": 1})
    data = base64.b64decode(result.data[0].b64_json)
    assert Image.open(io.BytesIO(data)).format == "JPEG" and result.size == "832x1248"
    with Flux2KleinClient(triton_server.grpc_url) as triton:
        want = triton.generate("a cat", seed=9, steps=1, width=832, height=1248, references=[ref])
    assert data == encoded(Image.fromarray(want), "JPEG", quality=95)


BAD = [  # (call, kwargs) -> the param OpenAI's error names and what its message says
    ("generate", dict(prompt="x", size="1000x1000"), "size", "1000x1000 is not supported"),
    ("generate", dict(prompt="x", size="big"), "size", "not WIDTHxHEIGHT"),
    ("generate", dict(prompt="x", n=5), "n", "less than or equal to 4"),
    ("generate", dict(prompt="x", response_format="url"), "response_format", "b64_json"),
    ("generate", dict(prompt="x", output_format="gif"), "output_format", "'png'"),
    ("generate", dict(prompt="x", background="transparent"), "background", "'opaque'"),
    ("generate", dict(prompt="x", extra_body={"seed": -3}), "seed", "greater than or equal to 0"),
    ("generate", dict(prompt="x", extra_body={"colour": "red"}), "colour", "unknown field"),
    ("edit", dict(prompt="x", image=[("a.png", b"x", "image/png")] * 5), "image", "at most 4 images, got 5"),
    ("edit", dict(prompt="x", image=("a.png", b"x", "image/png"), mask=("m.png", b"x", "image/png")), "mask",
     "not a decodable PNG"),
    ("edit", dict(prompt="x", image=("a.png", b"not an image", "image/png")), "image", "not a decodable"),
    ("edit", dict(prompt="x", image=("a.png", b"x", "image/png"), n=9), "n", "less than or equal to 4"),
]


@pytest.mark.parametrize("call,kwargs,param,says", BAD, ids=[f"{b[0]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_are_openai_400s_naming_the_param(client, call, kwargs, param, says):
    with pytest.raises(openai.BadRequestError) as caught:
        getattr(client.images, call)(**kwargs)
    error = caught.value
    assert error.status_code == 400
    assert error.body["type"] == "invalid_request_error" and error.body["param"] == param, error.body
    assert says in error.body["message"], error.body


def test_wrong_key_is_openai_401(gateway):
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.images.generate(prompt="x")
    assert caught.value.body["type"] == "authentication_error" and caught.value.body["code"] == "invalid_api_key"


def test_errors_elsewhere_keep_their_shape(gateway):
    """Only /v1/images/* answers in OpenAI's shape; NIM's /v1/infer keeps {"detail"}."""
    answer = http_request(gateway.port, "POST", "/v1/infer", {"prompt": "x", "n": 1},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status == 422 and answer.json()["detail"].startswith("n: unknown field")
    answer = http_request(gateway.port, "POST", "/v1/images/edits", {"prompt": "x"},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status == 400 and "multipart/form-data" in answer.json()["error"]["message"]


def test_a_refused_prompt_is_a_content_policy_error_and_nim_gets_a_black_content_filtered_artifact(client, gateway):
    """The served guardrail (on by default, the shipped list) refuses before any network runs; OpenAI's
    clients see its content_policy_violation error, NIM's see finishReason CONTENT_FILTERED with a black image."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a loli portrait")
    assert caught.value.body["code"] == "content_policy_violation", caught.value.body
    answer = http_request(gateway.port, "POST", "/v1/infer", {"prompt": "a loli portrait", "seed": 5},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert answer.status == 200, answer
    (artifact,) = answer.json()["artifacts"]
    assert artifact["finishReason"] == "CONTENT_FILTERED" and artifact["seed"] == 5
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(artifact["base64"]))))
    assert image.shape == (1024, 1024, 3) and not image.any()
