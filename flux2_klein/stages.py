"""One request's stages in their order, stated once, free of any transport.

    preprocess -> text_encoder -> sampler -> vae_decoder [-> postprocess] [-> safety]
                                     |
                                     +- vae_encoder: each reference, then the picture to change (once each)
                                     +- transformer: every step (one call for a batch of requests)

`Stages.run` is this order, the way TensorRT-LLM's BLS states its own once in a transport-free
`Decoder.decode` (preprocess, generate, postprocess; triton-inference-server/tensorrtllm_backend at 04bc437,
all_models/inflight_batcher_llm/tensorrt_llm_bls/1/lib/decode.py) and lets a subclass supply the calls
(its `TritonDecoder`, lib/triton_decoder.py). Here:

* `direct.DirectPipeline` implements every stage in one process (ONNX Runtime sessions);
* Triton runs `ENSEMBLE_STAGES` as the ensemble `flux2_klein` (`triton_config.ensemble_config` wires the
  models in exactly this order), and the sampler model makes its calls (`SAMPLER_CALLS`) through BLS,
  the conditions with `encode_conditions`, the same function `Stages.run` uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .sizes import latent_grid

ENSEMBLE_STAGES = ("preprocess", "text_encoder", "sampler", "vae_decoder", "postprocess")
# Stages a repository has only when built for them, each with what adds it. A Python model in the ensemble
# costs every request a round trip (~9 ms on the 2-core CPU machine, measured with Triton's statistics), so
# padding_mask_crop's paste back is not everyone's; the guardrail's `safety` model follows them all.
OPTIONAL_STAGES = {"postprocess": "build --padding-mask-crop"}
# The networks the sampler calls, in the order it first calls them.
SAMPLER_CALLS = ("vae_encoder", "transformer")


@dataclass
class Conditions:
    """The sampler's conditions for one request: each reference's tokens and latent grid (rows, cols), in
    request order, and the picture to change as tokens (inpainting, image-to-image; None without one)."""

    references: list[Any] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)
    image: Any = None


def encode_conditions(references: Sequence[np.ndarray], image: np.ndarray | None,
                      encode: Callable[[np.ndarray], Any]) -> Conditions:
    """The sampler's first stage: every reference (uint8 [H, W, 3]) through the VAE encoder in order, then
    the picture to change, each once (`encode`: one picture -> its packed tokens)."""
    return Conditions(references=[encode(r) for r in references],
                      grids=[latent_grid(r.shape[1], r.shape[0]) for r in references],
                      image=None if image is None else encode(image))


class Stages(ABC):
    """A request through every stage in order; a subclass supplies each stage."""

    def run(self, inputs: Mapping[str, np.ndarray | None]) -> np.ndarray:
        """The ensemble's `image` for its input tensors ({name: array}, absent = the default)."""
        req = self.preprocess(inputs)
        embeds = self.text_encoder(req)
        latents = self.sampler(req, embeds, encode_conditions(req.references, req.image, self.vae_encoder))
        return self.postprocess(req, self.vae_decoder(latents))

    @abstractmethod
    def preprocess(self, inputs: Mapping[str, np.ndarray | None]):
        """The validated request (request.Request), tokenizer ready; raises request.InvalidInput."""

    @abstractmethod
    def text_encoder(self, req) -> Any:
        """The prompt's embedding, [1, 512, D] (with guidance [2, ...]: the empty negative prompt's second)."""

    @abstractmethod
    def vae_encoder(self, image: np.ndarray) -> Any:
        """One picture's packed latent tokens."""

    @abstractmethod
    def sampler(self, req, embeds, conditions: Conditions) -> Any:
        """The denoising loop (calling the transformer every step): the final latents."""

    @abstractmethod
    def vae_decoder(self, latents) -> np.ndarray:
        """The decoded image, uint8 [H, W, 3]."""

    @abstractmethod
    def postprocess(self, req, image: np.ndarray) -> np.ndarray:
        """The answer: padding_mask_crop's paste back (mask_crop.py), else the image as it is."""
