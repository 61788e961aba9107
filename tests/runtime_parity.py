"""The parity every leaf runtime owes diffusers, written once and run for each (as diffusers' own
PipelineTesterMixin runs one set of checks for every pipeline): a test module subclasses `RuntimeParity` and
gives the fixture `served`, a running tritonserver on a repository of its runtime. ONNX Runtime:
tests/test_serving.py; torch: tests/test_torch_runtime.py. (TensorRT engines cannot run on a CPU:
tests/test_trt_rtx.py builds them from the same graphs.)

Each case is the product as a user calls it: the client library against a real server, the image against
diffusers' own pipeline on the same checkpoint and generator."""

from __future__ import annotations

import numpy as np
import pytest
from flux2_klein.client.triton_client import Flux2KleinClient


class RuntimeParity:
    """Subclasses provide the fixture `served` (a ServeCommand)."""

    @pytest.fixture(scope="class")
    def inpaint_pipe(self, tiny_ckpt):
        import torch
        from diffusers import Flux2KleinInpaintPipeline

        pipe = Flux2KleinInpaintPipeline.from_pretrained(tiny_ckpt, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def test_text_to_image_equals_diffusers(self, served, tiny_pipe):
        from test_serving import assert_equal_images, oracle

        prompt = "a red fox in the snow, every runtime"
        with Flux2KleinClient(served.grpc_url) as client:
            got = client.generate(prompt, width=1248, height=832, seed=11)
        assert_equal_images(got, oracle(tiny_pipe, prompt, width=1248, height=832, seed=11))

    def test_image_with_a_reference_equals_diffusers(self, served, tiny_pipe):
        from test_serving import assert_equal_images, encoded, oracle, pattern

        references = [encoded(pattern(768, 512, 1), "PNG")]
        prompt = "a lighthouse at dusk, torch runtime"
        with Flux2KleinClient(served.grpc_url) as client:
            got = client.generate(prompt, width=1568, height=672, seed=3, references=references)
        assert_equal_images(got, oracle(tiny_pipe, prompt, width=1568, height=672, seed=3, references=references))

    def test_inpaint_equals_diffusers_and_an_unbuilt_crop_is_refused_by_name(self, served, inpaint_pipe):
        from flux2_klein.client.triton_client import GenerationError
        from test_inpaint import PROMPT, _pipeline, mask_of, picture, png

        image, mask = picture(1024, 1024, 8), mask_of("rect", 1024, 1024)
        with Flux2KleinClient(served.http_url, protocol="http") as client:
            got = client.generate(PROMPT, seed=-3, steps=4, image=png(image), mask=png(mask), strength=0.8)
            # This repository is built without --padding-mask-crop (tests/test_inpaint_serving.py serves it).
            with pytest.raises(GenerationError) as caught:
                client.generate(PROMPT, steps=1, image=png(image), mask=png(mask), padding_mask_crop=8)
        assert caught.value.invalid_argument, caught.value
        assert "padding_mask_crop: not served by this repository" in caught.value.message, caught.value
        want, _ = _pipeline(inpaint_pipe, image, mask, float(np.float32(0.8)), None, -3)
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert got.shape == want.shape and diff.max() <= 2, diff.max()

    def test_loras_are_refused_by_name_without_a_library_and_empty_means_none(self, served, tiny_pipe):
        from flux2_klein.client.triton_client import GenerationError
        from test_serving import assert_equal_images, oracle

        # This repository is built without --lora-library (tests/test_lora_serving.py serves one).
        with Flux2KleinClient(served.grpc_url) as client:
            with pytest.raises(GenerationError) as caught:
                client.generate("a fox", steps=1, loras="style:0.8")
            got = client.generate("a fox", width=1248, height=832, seed=11, loras="")
        assert caught.value.invalid_argument, caught.value
        assert "loras: not served by this repository" in caught.value.message, caught.value
        assert_equal_images(got, oracle(tiny_pipe, "a fox", width=1248, height=832, seed=11))
