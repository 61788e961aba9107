"""The guardrail in the served pipeline (real tritonserver, the public model over gRPC): a refused prompt or
reference is answered INVALID_ARGUMENT before any network runs; an image classifier checks the output as the
ensemble's last step; `disable_safety_checker` counts only where the operator allows it; metrics count it."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import ServeCommand
from flux2_klein.guardrail.classifiers import ClassifierSettings
from flux2_klein.guardrail.settings import GuardrailSettings
from flux2_klein.triton_config import Instances
from test_guardrail import make_image_classifier
from test_serving import encoded, pattern


@pytest.fixture(scope="module")
def guarded(tiny_ckpt, onnx_dir, tmp_path_factory):
    from flux2_klein.repository import build_repository

    work = tmp_path_factory.mktemp("guarded")
    rules = work / "operator.txt"
    rules.write_text("[no-cats] cat\n")
    # A threshold every image reaches: each output (and reference) is deterministically unsafe here.
    viewer = ClassifierSettings(str(make_image_classifier(work / "vit")), ("nsfw",), 1e-6)
    settings = GuardrailSettings(blocklists=("default", str(rules)), image_classifier=viewer,
                                 allow_disable_safety_checker=True)
    repo = build_repository(tiny_ckpt, work / "repo", onnx_dir=onnx_dir, guardrail=settings,
                            instances=Instances(preprocess=1, sampler=1, text_encoder=1, transformer=1,
                                                vae_decoder=1, vae_encoder=1))
    server = ServeCommand.started(repo, work)
    yield server, repo
    server.stop()


def _infer(server, prompt: str, disable: bool | None = None, references=()):
    inputs = []

    def add(name, dtype, array):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)

    add("prompt", "BYTES", np.array([prompt.encode()], dtype=np.object_))
    if disable is not None:
        add("disable_safety_checker", "BOOL", np.array([disable]))
    if references:
        add("reference_images", "BYTES", np.array(list(references), dtype=np.object_))
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return client.infer("flux2_klein", inputs).as_numpy("image")


def _executions(server) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/stats") as r:
        return {m["name"]: int(m["execution_count"]) for m in json.loads(r.read())["model_stats"]}


def _filtered_metric(server) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
        lines = r.read().decode().splitlines()
    out = {}
    for line in lines:
        if line.startswith("flux2_klein_guardrail_filtered_total{"):
            out[line.split('stage="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_the_ensemble_ends_with_the_safety_model(guarded):
    _, repo = guarded
    ensemble = (repo / "flux2_klein" / "config.pbtxt").read_text()
    assert 'model_name: "safety"' in ensemble and 'value: "decoded_image"' in ensemble
    assert json.loads((repo / "build.json").read_text())["guardrail"]["allow_disable_safety_checker"] is True


def test_a_refused_prompt_costs_no_network_time(guarded):
    server, _ = guarded
    before = _executions(server)
    with pytest.raises(InferenceServerException) as e:
        _infer(server, "a photo of a CAT on a sofa")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "content filtered (prompt)" in e.value.message() and "blocklist" in e.value.message()
    assert "sofa" not in e.value.message()  # the answer names the list, never echoes the prompt
    after = _executions(server)
    assert all(after[m] == before[m] for m in ("text_encoder", "transformer", "vae_decoder", "sampler"))


def test_a_reference_is_checked_before_the_networks_and_the_output_after_them(guarded):
    server, _ = guarded
    before = _executions(server)
    with pytest.raises(InferenceServerException, match=r"content filtered \(reference\)"):
        _infer(server, "a lighthouse", references=[encoded(pattern(64, 64, 0), "PNG")])
    assert _executions(server)["transformer"] == before["transformer"]
    with pytest.raises(InferenceServerException, match=r"content filtered \(output\)") as e:
        _infer(server, "a lighthouse")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    metric = _filtered_metric(server)
    assert metric.get("prompt", 0) >= 1 and metric["reference"] >= 1 and metric["output"] >= 1


def test_disable_safety_checker_is_honoured_where_the_operator_allows_it(guarded):
    server, _ = guarded
    image = _infer(server, "a lighthouse", disable=True)
    assert image.shape == (1024, 1024, 3)
    with pytest.raises(InferenceServerException, match=r"content filtered \(prompt\)"):
        _infer(server, "a cat", disable=True)  # the prompt check is never skipped
