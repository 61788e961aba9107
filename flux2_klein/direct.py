"""The served pipeline without Triton: a repository's ONNX graphs called in one process.

    from flux2_klein.direct import DirectPipeline

    pipe = DirectPipeline("REPO")                      # a repository written by `flux2-klein build`
    image = pipe.generate("a red fox", width=1024, height=1024, seed=7)   # uint8 [H, W, 3]

The same steps as the ensemble, in the same order and with the same code: `request.parse_request`
and the repository's tokenizer (REPO/preprocess/1/tokenizer), the text encoder, `sampling.sample`
with the DiT (and the VAE encoder for references) as ONNX Runtime sessions, the VAE decoder. The
graphs are REPO/<network>/1/model.onnx and each session gets the thread count its Triton model is
configured with (`intra_op_threads`, 1 for the CPU repository) and is made by the served leaf's own
`ort_session.make_session`, so the image equals Triton's bit for bit
and the two differ only in what serving adds: the benchmark's baseline (`flux2-klein bench`).

The checkpoint facts the sampler needs (scheduler config, channels, distilled or not) come from the
repository's config.pbtxt parameters, or, for a repository without them, from the checkpoint that
REPO/build.json names.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .contract import Defaults, input_arrays
from .mask_crop import paste_back
from .ort_session import describe, make_session
from .request import PromptTokenizer, parse_request
from .sampling import mask_tokens, sample, use_cfg
from .specs import NETWORKS
from .stages import ENSEMBLE_STAGES, SAMPLER_CALLS, Conditions, Stages

# What `last_timings` holds: every stage and every network the sampler calls (stages.py states the order).
STAGES = (*ENSEMBLE_STAGES[:2], *SAMPLER_CALLS, *ENSEMBLE_STAGES[2:])


def model_config(repository: str | Path, model: str):
    """REPO/<model>/config.pbtxt parsed as Triton's ModelConfig protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(repository) / model / "config.pbtxt"
    if not path.is_file():
        raise FileNotFoundError(f"repository: {path} is missing; is {repository} a `flux2-klein build` output?")
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def model_parameters(repository: str | Path, model: str) -> dict[str, str]:
    config = model_config(repository, model)
    return {k: v.string_value for k, v in config.parameters.items()}


class DirectPipeline(Stages):
    """A repository's graphs behind one call, `generate` (or `infer` with the request's tensors).

    intra_op_threads: ONNX Runtime threads per session; None (default) takes each leaf model's
    `intra_op_threads` parameter (what Triton gives each instance), else 1.
    sessions: {network: object with ONNX Runtime's `run(output_names, feed)` and `get_outputs()`} to call
    instead of the repository's graphs (the bench's torch leaves, client/bench/torch_direct.py).
    Torch's own thread count is the caller's: the Triton sampler runs its math on one thread
    (ort_session.one_torch_thread), and the bench sets the same around its direct run.
    `last_timings` holds the seconds each stage took in the latest call (see STAGES; "sampler" is the
    loop's own work, without the transformer and VAE-encoder calls) and "total".
    """

    def __init__(self, repository: str | Path, *, intra_op_threads: int | None = None,
                 sessions: Mapping[str, Any] | None = None):
        self.repository = repo = Path(repository)
        pre = model_parameters(repo, "preprocess")
        self.crop_served = pre.get("padding_mask_crop") == "true"  # as the repository's preprocess reads it
        smp = model_parameters(repo, "sampler")
        if {"is_distilled"} <= pre.keys() and {"scheduler_config", "channels"} <= smp.keys():
            self.is_distilled = pre["is_distilled"] == "true"
            self.scheduler_config: dict[str, Any] = json.loads(smp["scheduler_config"])
            self.channels = int(smp["channels"])
        else:
            self._from_checkpoint()
        self.defaults = Defaults.for_checkpoint(self.is_distilled)
        self.tokenizer = PromptTokenizer(repo / "preprocess" / "1" / "tokenizer")

        self.sessions = {}
        self.threads = {}
        for name in NETWORKS:
            if sessions is not None:
                self.sessions[name] = sessions[name]
                self.threads[name] = intra_op_threads or int(model_parameters(repo, name).get("intra_op_threads", "1"))
                continue
            path = repo / name / "1" / "model.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"repository: {path} is missing (DirectPipeline runs the ONNX graphs "
                                        "of an onnxruntime repository)")
            threads = intra_op_threads or int(model_parameters(repo, name).get("intra_op_threads", "1"))
            # Made exactly as the served leaf makes it (model_repository/onnxruntime_leaf.py).
            self.sessions[name] = make_session(str(path), threads)
            self.threads[name] = threads
        self._outputs = {n: [o.name for o in s.get_outputs()] for n, s in self.sessions.items()}
        self.session_config = describe(self.threads) if sessions is None else "sessions given by the caller"
        self.last_timings: dict[str, float] = {}

    def _from_checkpoint(self) -> None:
        from .checkpoint import load_checkpoint

        manifest = self.repository / "build.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"repository: {self.repository} has neither the sampler's parameters "
                                    "nor a build.json naming its checkpoint")
        ckpt = load_checkpoint(json.loads(manifest.read_text())["checkpoint"])
        self.is_distilled = ckpt.is_distilled
        self.scheduler_config = dict(ckpt.scheduler)
        self.channels = ckpt.latent_channels

    def _run(self, network: str, feed: Mapping[str, Any]) -> list[np.ndarray]:
        start = time.perf_counter()
        feed = {k: np.ascontiguousarray(v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in feed.items()}
        out = self.sessions[network].run(self._outputs[network], feed)
        self.last_timings[network] = self.last_timings.get(network, 0.0) + time.perf_counter() - start
        return out

    def _transformer(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids):
        (velocity,) = self._run("transformer", {
            "hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
            "timestep": timestep, "img_ids": img_ids, "txt_ids": txt_ids,
        })
        return velocity

    def infer(self, inputs: Mapping[str, np.ndarray | None]) -> np.ndarray:
        """One request given as the ensemble's input tensors ({name: numpy array}, absent = default);
        returns the `image` output, uint8 [height, width, 3]. A bad input raises request.InvalidInput."""
        self.last_timings = {}
        t0 = time.perf_counter()
        image = self.run(inputs)  # stages.Stages: the ensemble's order
        self.last_timings["total"] = time.perf_counter() - t0
        return image

    # -- the stages (stages.Stages), each as its Triton model computes it ------------------------------------

    def preprocess(self, inputs):
        t0 = time.perf_counter()
        req = parse_request(inputs, self.defaults, crop_served=self.crop_served)
        self._do_cfg = use_cfg(self.is_distilled, req.guidance_scale)
        self._tokens = self.tokenizer.encode_request(req.prompt, self._do_cfg)
        self.last_timings["preprocess"] = time.perf_counter() - t0
        return req

    def text_encoder(self, req):
        ids, mask = self._tokens
        (embeds,) = self._run("text_encoder", {"input_ids": ids, "attention_mask": mask})
        return torch.from_numpy(embeds)

    def vae_encoder(self, image: np.ndarray):
        (tokens,) = self._run("vae_encoder", {"image": image})
        return tokens

    def sampler(self, req, embeds, conditions: Conditions):
        t_sampler = time.perf_counter()
        do_cfg = self._do_cfg
        # The values the Triton sampler reads back from its INT32/INT64/FP32 [1] inputs.
        guidance = float(np.float32(req.guidance_scale))
        latents = sample(
            self._transformer, embeds[:1], width=req.width, height=req.height, seed=req.seed,
            num_steps=req.num_inference_steps, scheduler_config=self.scheduler_config, channels=self.channels,
            references=conditions.references, reference_grids=conditions.grids, guidance_scale=guidance,
            do_cfg=do_cfg, negative_prompt_embeds=embeds[1:] if do_cfg else None, device="cpu",
            image=conditions.image, mask=None if req.mask is None else mask_tokens(req.mask),
            start_step=req.start_step,
        )
        self.last_timings["sampler"] = time.perf_counter() - t_sampler - self.last_timings.get("transformer", 0.0)
        return latents

    def vae_decoder(self, latents) -> np.ndarray:
        (image,) = self._run("vae_decoder", {"latents": latents})
        return image

    def postprocess(self, req, image: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        if req.crop_box is not None:  # the postprocess model's paste back
            image = paste_back(image, req.overlay, req.crop_box)
        self.last_timings["postprocess"] = time.perf_counter() - t0
        return image

    def generate(self, prompt: str, *, width: int | None = None, height: int | None = None,
                 seed: int | None = None, steps: int | None = None, guidance: float | None = None,
                 references: Iterable[bytes] = (), image: bytes | None = None, mask: bytes | None = None,
                 strength: float | None = None, padding_mask_crop: int | None = None) -> np.ndarray:
        """As `Flux2KleinClient.generate`: the same arguments, the same tensors, the same image."""
        arrays = input_arrays(prompt, width=width, height=height, seed=seed, steps=steps, guidance=guidance,
                              references=references, image=image, mask=mask, strength=strength,
                              padding_mask_crop=padding_mask_crop)
        return self.infer({name: array for name, (_, array) in arrays.items()})

    def __repr__(self) -> str:
        return f"DirectPipeline({str(self.repository)!r})"
