"""Test-only numpy twins of the sampler's torch math, and a small `Sampler` facade over `sampling.sample`.

Production code runs the torch versions (`euler_step_torch`, `cfg_combine_torch`, `initial_noise_tensor`);
these numpy versions are written independently from the diffusers scheduler and pipeline they imitate, so
that a test comparing both against diffusers checks two implementations, not one twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from flux2_klein import sampling
from flux2_klein.sizes import latent_grid


def euler_step(sample: np.ndarray, velocity: np.ndarray, sigma: np.float32, sigma_next: np.float32) -> np.ndarray:
    """`FlowMatchEulerDiscreteScheduler.step` (deterministic branch) in numpy: sample + (sigma_next - sigma) * v,
    dt first, then one float32 multiply and one float32 add, in the scheduler's order."""
    dt = np.float32(sigma_next) - np.float32(sigma)
    return sample.astype(np.float32, copy=False) + dt * velocity.astype(np.float32, copy=False)


def cfg_combine(cond: np.ndarray, uncond: np.ndarray, guidance_scale: float) -> np.ndarray:
    """The pipeline's `uncond + scale * (cond - uncond)` in float32 numpy, the scale rounded to float32 first."""
    return uncond + np.float32(guidance_scale) * (cond - uncond)


def initial_noise(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    """The pipeline's packed starting latents for `torch.Generator("cpu").manual_seed(seed)`: float32
    [h*w, C], drawn channel-first as `prepare_latents` draws them, then packed row-major."""
    rows, cols = latent_grid(width, height)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn((1, channels, rows, cols), generator=generator, dtype=torch.float32)
    return np.ascontiguousarray(noise[0].numpy().reshape(channels, rows * cols).T)


@dataclass
class Sampler:
    """`sampling.sample` with the checkpoint's facts bound and CFG decided as the pipeline decides it."""

    transformer: Callable[..., Any]
    scheduler_config: Mapping[str, Any]
    is_distilled: bool
    channels: int

    def __post_init__(self) -> None:
        sampling.scheduler_options(self.scheduler_config)  # refuse a bad config at construction

    def do_cfg(self, guidance_scale: float) -> bool:
        return sampling.use_cfg(self.is_distilled, guidance_scale)

    def __call__(self, prompt_embeds, *, width: int, height: int, seed: int, num_steps: int,
                 guidance_scale: float = 1.0, negative_prompt_embeds=None,
                 references: Sequence[Any] = (), reference_grids=None, step_callback=None,
                 device=None) -> torch.Tensor:
        return sampling.sample(
            self.transformer, prompt_embeds, width=width, height=height, seed=seed, num_steps=num_steps,
            scheduler_config=self.scheduler_config, channels=self.channels, references=references,
            reference_grids=reference_grids, guidance_scale=guidance_scale,
            do_cfg=self.do_cfg(guidance_scale), negative_prompt_embeds=negative_prompt_embeds,
            step_callback=step_callback, device=device,
        )


def transformer_timestep(t, batch: int) -> np.ndarray:
    """The DiT's `timestep` input: the scheduler's float32 t expanded to the batch, divided by 1000 in float32."""
    return np.full((batch,), t, dtype=np.float32) / sampling.TRANSFORMER_TIMESTEP_DIVISOR


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """[C, h, w] channel-first latents -> [h*w, C] tokens, row-major over the grid (`_pack_latents`)."""
    channels, rows, cols = latents.shape
    return np.ascontiguousarray(latents.reshape(channels, rows * cols).T)
