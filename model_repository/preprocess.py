"""Triton model `preprocess`: validate the request, tokenize, decode references (flux2_klein.request)."""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from flux2_klein import mask_crop, sampler_io
from flux2_klein.contract import INPUT_NAMES, Defaults
from flux2_klein.guardrail import ContentFiltered
from flux2_klein.guardrail.triton import TritonGuardrail, filtered_response
from flux2_klein.lora_library import served_names
from flux2_klein.request import InvalidInput, PromptTokenizer, parse_request
from flux2_klein.sampling import use_cfg
from flux2_klein.triton_tensors import error_response, get_numpy, params, to_triton


class TritonPythonModel:
    def initialize(self, args):
        config = params(json.loads(args["model_config"]))
        self.is_distilled = config["is_distilled"] == "true"
        self.defaults = Defaults.for_checkpoint(self.is_distilled)
        self.crop_served = config.get("padding_mask_crop") == "true"  # the postprocess model's paste back
        self.lora_names = served_names(config)  # the DiT's LoRA library (built with --lora-library)
        self.tokenizer = PromptTokenizer(os.path.join(args["model_repository"], args["model_version"], "tokenizer"))
        self.negative = self.tokenizer.encode("")  # klein's negative prompt is always "": tokenized once
        self.guard = TritonGuardrail(args, stages=("prompt", "reference"))

    def _outputs(self, request):
        inputs = {name: get_numpy(request, name) for name in INPUT_NAMES}
        req = parse_request(inputs, self.defaults, crop_served=self.crop_served, lora_names=self.lora_names)
        disable = inputs["disable_safety_checker"] is not None and bool(inputs["disable_safety_checker"].reshape(-1)[0])
        # Before any GPU work: a refused prompt or reference costs no text encoder or DiT time.
        pictures = req.references if req.image is None else [req.image, *req.references]  # the picture too
        check_output = self.guard.check_request(request, req.prompt, pictures, disable)
        ids, mask = self.tokenizer.encode(req.prompt)
        guided = use_cfg(self.is_distilled, req.guidance_scale)
        message = sampler_io.pack(req, guided, self.negative)
        return [to_triton("input_ids", ids), to_triton("attention_mask", mask),
                *(to_triton(name, value) for name, value in message.items()),
                *(to_triton(name, value) for name, value in mask_crop.pack(req.crop_box, req.overlay).items()),
                to_triton("check_output", np.array([check_output]))]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(self._outputs(request)))
            except ContentFiltered as e:
                responses.append(filtered_response(e))
            except InvalidInput as e:
                responses.append(error_response(str(e), invalid_argument=True))
            except Exception as e:  # noqa: BLE001 - answer, log, keep serving
                pb_utils.Logger.log_error(f"preprocess: {type(e).__name__}: {e}")
                responses.append(error_response(f"preprocess failed: {type(e).__name__}: {e}"))
        return responses
