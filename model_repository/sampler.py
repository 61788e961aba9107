"""Triton model `sampler`: the denoising loop (flux2_klein.sampling), calling the DiT through BLS.

Reference images go through `vae_encoder` once per request; every step sends the noise tokens plus the
reference tokens to `transformer`. On a GPU instance every tensor stays on the GPU: inputs arrive there
(FORCE_CPU_ONLY_INPUT_TENSORS off), BLS asks for GPU outputs, and tensors cross by DLPack.
"""

import json

import torch
import triton_python_backend_utils as pb_utils

from flux2_klein.preprocess import unpack_references
from flux2_klein.sampling import sample
from flux2_klein.sizes import latent_grid
from flux2_klein.triton_tensors import bls, error_response, get_input, get_numpy, params, to_triton


class TritonPythonModel:
    def initialize(self, args):
        config = params(json.loads(args["model_config"]))
        self.scheduler_config = json.loads(config["scheduler_config"])
        self.channels = int(config["channels"])
        gpu = args["model_instance_kind"] == "GPU"
        self.device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"

    def _dit(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids):
        (velocity,) = bls("transformer", {
            "hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
            "timestep": timestep, "img_ids": img_ids, "txt_ids": txt_ids,
        }, ["velocity"], self.device)
        return velocity

    def _references(self, request):
        pixels, shapes = get_numpy(request, "reference_pixels"), get_numpy(request, "reference_shapes")
        tokens, grids = [], []
        for image in unpack_references(pixels, shapes):
            (t,) = bls("vae_encoder", {"image": torch.from_numpy(image.copy())}, ["tokens"], self.device)
            tokens.append(t)
            grids.append(latent_grid(image.shape[1], image.shape[0]))
        return tokens, grids

    def _latents(self, request):
        embeds = get_input(request, "prompt_embeds").to(self.device)
        scalar = lambda name: get_numpy(request, name).reshape(-1)[0].item()  # noqa: E731
        do_cfg = embeds.shape[0] == 2  # preprocess sends (prompt, "") exactly when guidance applies
        tokens, grids = self._references(request)
        return sample(
            self._dit, embeds[:1], width=scalar("width"), height=scalar("height"), seed=scalar("seed"),
            num_steps=scalar("num_inference_steps"), scheduler_config=self.scheduler_config,
            channels=self.channels, references=tokens, reference_grids=grids,
            guidance_scale=scalar("guidance_scale"), do_cfg=do_cfg,
            negative_prompt_embeds=embeds[1:] if do_cfg else None, device=self.device,
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse([to_triton("latents", self._latents(request))]))
            except Exception as e:  # noqa: BLE001 - answer, log, keep serving
                pb_utils.Logger.log_error(f"sampler: {type(e).__name__}: {e}")
                responses.append(error_response(f"sampler failed: {type(e).__name__}: {e}"))
        return responses
