"""The stage order stated once (flux2_klein/stages.py) and what derives from it: the ensemble's steps, each fed
only by the request or an earlier step, and the in-process pipeline's stages. No Triton here; the served
order is exercised end to end by tests/test_serving.py and tests/test_inpaint_serving.py."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from flux2_klein.checkpoint import load_checkpoint
from flux2_klein.specs import network_specs
from flux2_klein.stages import ENSEMBLE_STAGES, OPTIONAL_STAGES, SAMPLER_CALLS, Stages
from flux2_klein.triton_config import SAFETY_MODEL, ensemble_config, postprocess_config, Instances


@pytest.mark.parametrize("safety", [False, True])
@pytest.mark.parametrize("postprocess", [False, True])
def test_the_ensemble_runs_the_stages_in_their_order_each_fed_by_an_earlier_one(tiny_ckpt, safety, postprocess):
    specs = network_specs(load_checkpoint(tiny_ckpt))
    config = text_format.Parse(ensemble_config(specs, safety, postprocess), model_config_pb2.ModelConfig())
    steps = config.ensemble_scheduling.step
    stages = [s for s in ENSEMBLE_STAGES if s not in OPTIONAL_STAGES or postprocess]
    assert [s.model_name for s in steps] == [*stages, *((SAFETY_MODEL,) if safety else ())]
    available = {i.name for i in config.input}
    produced_by = {}
    for s in steps:
        missing = set(s.input_map.values()) - available
        assert not missing, f"{s.model_name} reads {missing} before any step writes it"
        for tensor in s.output_map.values():
            assert tensor not in produced_by, f"{tensor}: written by {produced_by[tensor]} and {s.model_name}"
            produced_by[tensor] = s.model_name
        available |= set(s.output_map.values())
    assert produced_by["image"] == (SAFETY_MODEL if safety else stages[-1])
    read = {v for s in steps for v in s.input_map.values()}
    assert set(produced_by) - read == {"image"}, "every intermediate tensor is read by a later step"


def test_the_postprocess_model_takes_the_decoded_image_and_answers_its_shape(tiny_ckpt):
    specs = network_specs(load_checkpoint(tiny_ckpt))
    config = text_format.Parse(postprocess_config(specs["vae_decoder"], Instances()), model_config_pb2.ModelConfig())
    (decoded,) = specs["vae_decoder"].outputs
    assert [i.name for i in config.input] == [decoded.name, "crop_box", "overlay"]
    assert [o.name for o in config.output] == [decoded.name] and list(config.output[0].dims) == [-1, -1, 3]


def test_the_in_process_pipeline_implements_every_stage():
    from flux2_klein.direct import STAGES, DirectPipeline

    assert issubclass(DirectPipeline, Stages) and not getattr(DirectPipeline, "__abstractmethods__", None)
    assert set(STAGES) == {*ENSEMBLE_STAGES, *SAMPLER_CALLS}
    for stage in (*ENSEMBLE_STAGES, *SAMPLER_CALLS):
        if stage != "transformer":  # called inside the sampler stage, every step
            assert callable(getattr(DirectPipeline, stage)), stage


def test_the_bench_reads_every_stage_and_every_network_the_sampler_calls():
    from flux2_klein.client.bench.stats import MODEL, MODELS

    assert set(MODELS) == {MODEL, *ENSEMBLE_STAGES, *SAMPLER_CALLS}
