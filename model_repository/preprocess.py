"""Triton model `preprocess`: validate the request, tokenize, decode references (flux2_klein.preprocess)."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from flux2_klein.preprocess import Defaults, InvalidInput, PromptTokenizer, pack_references, parse_request
from flux2_klein.sampling import use_cfg
from flux2_klein.triton_tensors import error_response, get_numpy, params, to_triton

INPUTS = ("prompt", "height", "width", "seed", "num_inference_steps", "guidance_scale", "reference_images")


class TritonPythonModel:
    def initialize(self, args):
        config = params(json.loads(args["model_config"]))
        self.is_distilled = config["is_distilled"] == "true"
        self.defaults = Defaults.for_checkpoint(self.is_distilled)
        self.tokenizer = PromptTokenizer(os.path.join(args["model_repository"], args["model_version"], "tokenizer"))

    def _outputs(self, request):
        req = parse_request({name: get_numpy(request, name) for name in INPUTS}, self.defaults)
        ids, mask = self.tokenizer.encode_request(req.prompt, use_cfg(self.is_distilled, req.guidance_scale))
        pixels, shapes = pack_references(req.references)
        return [
            to_triton("input_ids", ids),
            to_triton("attention_mask", mask),
            to_triton("height", np.array([req.height], dtype=np.int32)),
            to_triton("width", np.array([req.width], dtype=np.int32)),
            to_triton("seed", np.array([req.seed], dtype=np.int64)),
            to_triton("num_inference_steps", np.array([req.num_inference_steps], dtype=np.int32)),
            to_triton("guidance_scale", np.array([req.guidance_scale], dtype=np.float32)),
            to_triton("reference_pixels", pixels),
            to_triton("reference_shapes", shapes),
        ]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(self._outputs(request)))
            except InvalidInput as e:
                responses.append(error_response(str(e), invalid_argument=True))
            except Exception as e:  # noqa: BLE001 - answer, log, keep serving
                pb_utils.Logger.log_error(f"preprocess: {type(e).__name__}: {e}")
                responses.append(error_response(f"preprocess failed: {type(e).__name__}: {e}"))
        return responses
