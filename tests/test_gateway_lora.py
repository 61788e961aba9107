"""Per-request LoRAs through the gateway (client/gateway/, CONTRACT.md section 4): NIM's and OpenAI's `loras`
field, OpenAI's `model` naming a LoRA, and the listings (/v1/models, /v1/loras). First the fields' forms
and messages, checked without HTTP; then a real gateway in front of a real tritonserver serving a torch
repository built with a LoRA library (conftest's lora_folder on the tiny checkpoint), driven over HTTP, by
the `openai` client and by Flux2KleinClient. No mocks: each image through the gateway equals the Triton
client's for the same LoRAs, bit for bit (one server)."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import LORA_LIBRARY, ServeCommand
from flux2_klein.client.gateway.nim_protocol import InferRequest, parse_body
from flux2_klein.client.gateway.openai_protocol import names_base_model, openai_error, request_schemas, validated
from flux2_klein.client.gateway.protocol import ApiError, body_schema, check_loras
from flux2_klein.client.triton_client import Flux2KleinClient

NAMES = tuple(sorted(LORA_LIBRARY))  # ("detail", "ink.v2", "style"): the library, in name order
PROMPT = "a lighthouse"
STEPS = 1


# ---------------------------------------------------------------------------------------------------------------
# The fields, without HTTP
# ---------------------------------------------------------------------------------------------------------------

def nim_loras(value):
    return parse_body(json.dumps({"prompt": "x", "loras": value}).encode()).generation().loras


@pytest.mark.parametrize("value,want", [
    ("style:0.8,detail", (("style", 0.8), ("detail", 1.0))),
    ([{"name": "style", "scale": 0.8}, {"name": "ink.v2"}], (("style", 0.8), ("ink.v2", 1.0))),
    ([{"name": "detail", "scale": -2}], (("detail", -2.0),)),
    ("", ()), ([], ()), (None, ()),
])
def test_nim_loras_take_the_wire_form_or_a_list_of_objects(value, want):
    assert nim_loras(value) == want


@pytest.mark.parametrize("value,says", [
    ("style:loud", "loras: style: scale 'loud' is not a number"),
    ("style:9", "loras: style: scale 9 is outside -8..8"),
    ("style,style", "loras: style is named twice"),
    ("a,b,c,d,e", "loras: 5 LoRAs; at most 4 per request"),
    ("no spaces", "loras: 'no spaces' is not a LoRA name"),
    ([{"name": "a,b"}], "loras[0]: 'a,b' is not a LoRA name"),  # would read as two names on the wire
    ([{"name": "style", "scale": 8.5}], "loras: style: scale 8.5 is outside -8..8"),
    ([{"name": "style", "scale": "x"}], 'loras[0].scale: Input should be a valid number; got "x"'),
    ([{"scale": 1}], "loras[0].name: required"),
    ([{"name": "style", "weight": 1}], "loras[0].weight: unknown field; allowed fields: name, scale"),
    (5, "loras: Input should be a valid string; got 5"),
])
def test_nim_malformed_loras_are_422_naming_the_field(value, says):
    with pytest.raises(ApiError) as caught:
        nim_loras(value)
    assert caught.value.status == 422 and caught.value.detail.startswith(says), caught.value.detail


def test_openai_loras_field_in_json_and_form_and_its_errors_name_the_param():
    assert validated({"prompt": "x", "loras": "ink.v2:0.5"}, strict=True).generation([]).loras == (("ink.v2", 0.5),)
    assert validated({"prompt": "x", "loras": [{"name": "style"}]}, strict=True).generation([]).loras == (
        ("style", 1.0),)
    assert validated({"prompt": "x", "loras": "detail"}, strict=False).generation([b"x"]).loras == (("detail", 1.0),)
    with pytest.raises(ApiError) as caught:
        validated({"prompt": "x", "loras": "style:99"}, strict=True).generation([])
    status, body = openai_error(caught.value.status, caught.value.detail)
    assert status == 400 and body["error"]["param"] == "loras" and body["error"]["type"] == "invalid_request_error"


def test_the_model_field_names_the_base_model_or_a_lora_first():
    assert names_base_model(None, "flux2_klein") and names_base_model("flux2_klein", "flux2_klein")
    assert names_base_model("FLUX2-klein", "my_ensemble") and names_base_model("my_ensemble", "my_ensemble")
    assert not names_base_model("style", "flux2_klein") and not names_base_model("dall-e-3", "flux2_klein")
    assert check_loras("detail:0.5", first=("style",)) == (("style", 1.0), ("detail", 0.5))
    assert check_loras(None, first=("style",)) == (("style", 1.0),)
    with pytest.raises(ApiError) as caught:
        check_loras("style:0.5", first=("style",))
    assert caught.value.detail == "loras: style is named twice (with model's LoRA 'style' first)"


def test_the_request_schemas_describe_loras_without_dangling_references():
    """The bodies' schemas go into /openapi.json as they are: LoraChoice is written in place, not as $defs."""
    for schema in (body_schema(InferRequest), *request_schemas()):
        text = json.dumps(schema)
        assert "$ref" not in text and "$defs" not in text
        (forms,) = [a["oneOf"] for a in schema["properties"]["loras"]["anyOf"] if "oneOf" in a]
        assert forms[0] == {"type": "string"} and forms[1]["items"]["required"] == ["name"]


# ---------------------------------------------------------------------------------------------------------------
# A real gateway in front of a real Triton with a LoRA library
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_server(tiny_ckpt, lora_folder, tmp_path_factory):
    from flux2_klein.repository import build_repository
    from flux2_klein.triton_config import Instances

    repo = build_repository(tiny_ckpt, tmp_path_factory.mktemp("gateway-lora") / "repo", runtime="torch",
                            device="cpu", lora_library=lora_folder,
                            instances=Instances(preprocess=1, text_encoder=1, sampler=1, transformer=1,
                                                vae_decoder=1, vae_encoder=1))
    server = ServeCommand.started(repo, tmp_path_factory.mktemp("gateway-lora-logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(lora_server):
    from test_gateway import InProcessGateway

    gw = InProcessGateway(triton_url=lora_server.grpc_url, timeout_s=300)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def openai_client(gateway):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def triton(lora_server):
    with Flux2KleinClient(lora_server.grpc_url) as client:
        yield client


def png_pixels(b64: str) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


@pytest.mark.slow
def test_models_and_loras_list_the_library(gateway, openai_client, lora_server):
    with Flux2KleinClient(lora_server.http_url, protocol="http") as http_client, \
            Flux2KleinClient(lora_server.grpc_url) as grpc_client:
        assert http_client.lora_names() == grpc_client.lora_names() == NAMES
    models = gateway.request("GET", "/v1/models")
    assert models.status == 200, models
    data = models.json()["data"]
    assert [m["id"] for m in data] == ["flux2_klein", *NAMES]
    assert data[0]["parent"] is None and all(m["parent"] == "flux2_klein" and m["object"] == "model"
                                             for m in data[1:])
    assert [m.id for m in openai_client.models.list()] == ["flux2_klein", *NAMES]
    loras = gateway.request("GET", "/v1/loras")
    assert loras.status == 200, loras
    assert [x["name"] for x in loras.json()["data"]] == list(NAMES)
    assert loras.json()["data"][0]["scale_range"] == [-8, 8] and loras.json()["max_per_request"] == 4
    spec = gateway.request("GET", "/openapi.json").json()
    assert "/v1/loras" in spec["paths"] and "loras" in json.dumps(spec["paths"]["/v1/infer"])
    assert 'path="/v1/loras"' in gateway.metrics()


@pytest.mark.slow
def test_infer_with_loras_equals_the_triton_client(gateway, triton):
    answer = gateway.infer({"prompt": PROMPT, "seed": 4, "steps": STEPS,
                            "loras": [{"name": "style", "scale": 0.8}, {"name": "detail"}]})
    assert answer.status == 200, answer
    got = png_pixels(answer.json()["artifacts"][0]["base64"])
    want = triton.generate(PROMPT, seed=4, steps=STEPS, loras="style:0.8,detail")
    assert np.array_equal(got, want)
    plain = triton.generate(PROMPT, seed=4, steps=STEPS)
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 20, "the LoRAs changed nothing"


@pytest.mark.slow
def test_openai_model_naming_a_lora_equals_that_lora_at_scale_1(openai_client, triton):
    """model="ink.v2" is loras "ink.v2:1.0"; with the `loras` field its LoRA comes first; the served model's
    own name is the base with the field's LoRAs alone."""
    for model, loras, want in (("ink.v2", None, "ink.v2:1.0"), ("ink.v2", "detail:0.5", "ink.v2,detail:0.5"),
                               ("flux2_klein", [{"name": "style", "scale": 0.8}], {"style": 0.8})):
        extra = {"seed": 5, "steps": STEPS, **({"loras": loras} if loras is not None else {})}
        result = openai_client.images.generate(model=model, prompt=PROMPT, size="1024x1024", extra_body=extra)
        assert np.array_equal(png_pixels(result.data[0].b64_json),
                              triton.generate(PROMPT, seed=5, steps=STEPS, loras=want)), (model, loras)


@pytest.mark.slow
def test_openai_edit_takes_loras_as_a_form_field(openai_client, triton):
    from test_gateway import encoded, pattern

    ref = encoded(pattern(512, 512, 1), "PNG")
    result = openai_client.images.edit(model="style", prompt="make it winter", image=("a.png", ref, "image/png"),
                                       extra_body={"seed": 2, "steps": STEPS, "loras": "detail:-1"})
    want = triton.generate("make it winter", seed=2, steps=STEPS, references=[ref], loras="style,detail:-1")
    assert np.array_equal(png_pixels(result.data[0].b64_json), want)


@pytest.mark.slow
def test_unknown_loras_and_models_are_400_naming_the_field_and_serving_goes_on(gateway, openai_client):
    openai = pytest.importorskip("openai")
    served = ", ".join(NAMES)
    answer = gateway.infer({"prompt": PROMPT, "loras": "sketch"})
    assert answer.status == 422, answer
    assert answer.detail == f"loras: 'sketch' is not in this server's LoRA library; served: {served}", answer
    assert gateway.infer({"prompt": PROMPT, "loras": "style:9"}).detail.startswith("loras: style: scale 9")
    for kwargs, param, says in (
            (dict(extra_body={"loras": [{"name": "sketch"}]}), "loras", "loras: 'sketch' is not in this server's"),
            (dict(model="sketch"), "model", f"model: 'sketch' is not served here; served: flux2_klein, {served}"),
            (dict(model="dall-e-3"), "model", "model: 'dall-e-3' is not served here"),
            (dict(model="style", extra_body={"loras": "style:0.5"}), "loras", "loras: style is named twice")):
        with pytest.raises(openai.BadRequestError) as caught:
            openai_client.images.generate(prompt=PROMPT, **kwargs)
        error = caught.value.body
        assert error["param"] == param and error["message"].startswith(says), error
    answer = gateway.infer({"prompt": PROMPT, "seed": 1, "steps": STEPS, "loras": "detail"})
    assert answer.status == 200 and answer.json()["artifacts"][0]["finishReason"] == "SUCCESS", answer


@pytest.mark.slow
def test_a_repository_without_a_library_lists_none_and_refuses_loras_by_name(triton_server):
    from test_gateway import InProcessGateway

    gw = InProcessGateway(triton_url=triton_server.grpc_url)
    try:
        assert [m["id"] for m in gw.request("GET", "/v1/models").json()["data"]] == ["flux2_klein"]
        assert gw.request("GET", "/v1/loras").json()["data"] == []
        answer = gw.infer({"prompt": PROMPT, "loras": "style"})
        assert answer.status == 422 and answer.detail.startswith("loras: "), answer
        answer = gw.request("POST", "/v1/images/generations", {"prompt": PROMPT, "model": "style"})
        assert answer.status == 400 and answer.json()["error"]["message"] == (
            "model: 'style' is not served here; served: flux2_klein"), answer
    finally:
        gw.stop()
