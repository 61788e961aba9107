"""Triton model `sampler`: the denoising loop (flux2_klein.sampling), calling the DiT through BLS.

A batching model: Triton's dynamic batcher hands `execute` the requests queued together; those of one
shape (size, steps, guidance, reference grids: `sampling.plan_batches`) run as one loop whose every step is
one DiT call for all of them. References (and an inpainting request's picture) go through `vae_encoder` once
per request; under guidance the
empty negative prompt is encoded once (through `text_encoder`) and kept. On a GPU instance every tensor
stays on the GPU: inputs arrive there (FORCE_CPU_ONLY_INPUT_TENSORS off), BLS asks for GPU outputs, and
tensors cross by DLPack.
"""

import functools
import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from flux2_klein import sampler_io
from flux2_klein.dtypes import torch_dtype
from flux2_klein.lora_library import format_choice
from flux2_klein.ort_session import one_torch_thread
from flux2_klein.sampling import Job, plan_batches, sample_batch
from flux2_klein.stages import encode_conditions
from flux2_klein.triton_config import SAMPLER_INPUTS
from flux2_klein.triton_tensors import bls, error_response, get_input, get_numpy, params, to_triton


class TritonPythonModel:
    def initialize(self, args):
        config = params(json.loads(args["model_config"]))
        self.scheduler_config = json.loads(config["scheduler_config"])
        self.channels = int(config["channels"])
        self.max_rows = int(config["max_dit_rows"])
        self.dit_dtype = torch_dtype(config.get("dit_dtype", "fp32"))  # the DiT's hidden/encoder state boundary
        gpu = args["model_instance_kind"] == "GPU"
        self.device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        if not gpu:
            one_torch_thread()  # the loop's small tensors: more threads only wait on each other (ort_session.py)
        self.negatives = {}  # the negative prompt's tokens -> its embedding, on self.device

    def _dit(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, loras=None):
        inputs = {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
                  "timestep": timestep, "img_ids": img_ids, "txt_ids": txt_ids}
        if loras is not None:  # only a DiT with a LoRA library has this input (preprocess refuses loras elsewhere)
            inputs["loras"] = loras
        (velocity,) = bls("transformer", inputs, ["velocity"], self.device)
        return velocity

    def _vae_encoder(self, image):
        (tokens,) = bls("vae_encoder", {"image": torch.from_numpy(image.copy())}, ["tokens"], self.device)
        return tokens

    def _negative(self, req):
        key = req.negative_input_ids.tobytes()
        if key not in self.negatives:
            (embeds,) = bls("text_encoder", {"input_ids": torch.from_numpy(req.negative_input_ids.copy()),
                                             "attention_mask": torch.from_numpy(req.negative_attention_mask.copy())},
                            ["prompt_embeds"], self.device)
            self.negatives[key] = embeds.to(self.device).clone()  # ours, not a view of Triton's buffer
        return self.negatives[key]

    def _job(self, request):
        req = sampler_io.unpack({t.name: get_numpy(request, t.name) for t in SAMPLER_INPUTS})
        conditions = encode_conditions(req.references, req.image, self._vae_encoder)  # stages.py's order
        mask = None if req.mask is None else torch.from_numpy(req.mask.copy()).to(self.device)
        embeds = get_input(request, "prompt_embeds").to(self.device)  # [1, 512, D]: a batch of one
        negative = self._negative(req) if req.guided else None
        return req, Job(embeds, req.seed, req.guidance_scale, negative, conditions.references, conditions.image, mask)

    def _run(self, group, jobs, responses):
        first = jobs[group[0]][0]
        shape = first.shape
        # The batch's one set, as the DiT's input: made once for every step of the loop.
        loras = np.array([format_choice(shape.loras).encode("utf-8")], dtype=np.object_) if shape.loras else None
        try:
            latents = sample_batch(
                functools.partial(self._dit, loras=loras), [jobs[i][1] for i in group],
                width=shape.width, height=shape.height,
                num_steps=shape.num_steps, scheduler_config=self.scheduler_config, channels=self.channels,
                do_cfg=shape.do_cfg, reference_grids=shape.reference_grids, device=self.device,
                dit_dtype=self.dit_dtype, start_step=shape.start_step,
            )
        except Exception as e:  # noqa: BLE001 - answer, log, keep serving
            if len(group) > 1:  # one request's failure must not fail the others: each again, alone
                for i in group:
                    self._run([i], jobs, responses)
                return
            pb_utils.Logger.log_error(f"sampler: {type(e).__name__}: {e}")
            responses[group[0]] = error_response(f"sampler failed: {type(e).__name__}: {e}")
            return
        for i, lat in zip(group, latents):
            responses[i] = pb_utils.InferenceResponse([to_triton("latents", lat[None])])

    def execute(self, requests):
        responses = [None] * len(requests)
        jobs = {}
        for i, request in enumerate(requests):
            try:
                jobs[i] = self._job(request)
            except Exception as e:  # noqa: BLE001
                pb_utils.Logger.log_error(f"sampler: {type(e).__name__}: {e}")
                responses[i] = error_response(f"sampler failed: {type(e).__name__}: {e}")
        order = list(jobs)
        for batch in plan_batches([jobs[i][0].shape for i in order], self.max_rows):
            self._run([order[k] for k in batch], jobs, responses)
        return responses
