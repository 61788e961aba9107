"""The sampler's math: FLUX.2 [klein]'s denoising loop as plain numpy, with no transport in it.

The Triton "sampler" model wraps this module; the DiT and the VAE live in other models and are reached
through callables. Everything here reproduces diffusers' `Flux2KleinPipeline.__call__` (v0.42.1) and the
`FlowMatchEulerDiscreteScheduler` it drives, bit for bit where the pipeline is deterministic: the sigma
schedule, the initial noise, the position ids, the Euler update and the guidance combination. The only
difference from the pipeline is that classifier-free guidance runs the transformer once with a batch of
two (conditional, unconditional) rather than twice with a batch of one.

Shapes at the boundary (all numpy, float32 unless said otherwise; h, w = `latent_grid(width, height)`):
  noise / latent tokens   [h*w, C]       C = transformer in_channels (128 for the real klein, 32 tiny)
  reference tokens        [h_i*w_i, C]   per reference image, as `prepare_image_latents` packs them
  prompt embeds           [1, 512, D]    (or [512, D])
  final latents           [h, w, C]      the packed tokens reshaped row-major onto the token grid
  position ids            int64 [N, 4]   (t, row, col, l)

torch is imported only where the pipeline's own random number generator must be reproduced exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flux2_klein.sizes import TEXT_TOKENS, latent_grid

# The pipeline hands the transformer `timestep / 1000` with a literal 1000, whatever the scheduler's
# num_train_timesteps; the transformer multiplies by 1000 again inside.
TRANSFORMER_TIMESTEP_DIVISOR = np.float32(1000.0)

# `_prepare_image_ids(scale=10)`: the i-th reference image sits at t = 10 + 10 * i; the noise tokens and
# the text are at t = 0.
REFERENCE_T_SCALE = 10

# diffusers' FlowMatchEulerDiscreteScheduler.__init__ defaults: a scheduler_config.json that leaves a key
# out gets these, exactly as `FlowMatchEulerDiscreteScheduler.from_config` would.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}

# Options this module does not reproduce: each must be absent or false/None. The released klein checkpoints
# use none of them; a checkpoint that does gets an error rather than a silently different picture.
_UNSUPPORTED_OPTIONS = (
    "invert_sigmas",  # only Mochi uses it
    "shift_terminal",  # LTX-Video's stretch of the schedule
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "stochastic_sampling",  # would draw fresh noise every step from the generator
    "use_flow_sigmas",  # the pipeline drops its linspace sigmas when a scheduler config sets this
)
# Keys that do not change the schedule: base_shift, max_shift, base_image_seq_len and max_image_seq_len
# feed `calculate_shift`, which the klein pipeline does not call (it uses `compute_empirical_mu`).
_KNOWN_OPTIONS = frozenset(SCHEDULER_DEFAULTS) | {"use_flow_sigmas"}


# --------------------------------------------------------------------------------------------- schedule


def base_sigmas(num_steps: int) -> np.ndarray:
    """The unshifted sigmas the pipeline starts from: `np.linspace(1, 1/steps, steps)`, as float32.

    The pipeline builds them in float64 and `set_timesteps(sigmas=...)` casts them to float32 at once, so
    the float32 values are what every later operation sees.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The resolution- and step-count-dependent shift `mu` of FLUX.2 (pipeline_flux2.compute_empirical_mu).

    A straight line in the number of steps between two fits of image length (at 10 and at 200 steps); above
    4300 image tokens only the 200-step fit is used. Kept as the same Python-float arithmetic, in the same
    order, so mu is the identical double. `image_seq_len` counts noise tokens only, not reference tokens.
    """
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666

    if image_seq_len > 4300:
        mu = a2 * image_seq_len + b2
        return float(mu)

    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1

    a = (m_200 - m_10) / 190.0
    b = m_200 - 200.0 * a
    mu = a * num_steps + b

    return float(mu)


def scheduler_options(scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler config with diffusers' defaults filled in, after refusing what we do not implement.

    `scheduler_config` is the dict from the checkpoint's scheduler/scheduler_config.json; keys starting with
    an underscore (_class_name, _diffusers_version) are metadata and ignored. Unknown keys are refused too:
    a newer diffusers option could change the schedule without us noticing.
    """
    cls = scheduler_config.get("_class_name")
    if cls is not None and cls != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"only FlowMatchEulerDiscreteScheduler is implemented, the checkpoint has {cls}")
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    unknown = sorted(set(config) - _KNOWN_OPTIONS)
    if unknown:
        raise ValueError(f"scheduler config has options this sampler does not know: {unknown}")
    used = sorted(k for k in _UNSUPPORTED_OPTIONS if config.get(k))
    if used:
        raise NotImplementedError(
            f"scheduler options {used} are set, and this sampler only implements the plain flow-match Euler "
            "schedule (with static or dynamic exponential/linear shifting) that FLUX.2 [klein] uses"
        )
    options = {**SCHEDULER_DEFAULTS, **config}
    if options["time_shift_type"] not in ("exponential", "linear"):
        raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {options['time_shift_type']!r}")
    return options


def _shift_sigmas(sigmas: np.ndarray, options: Mapping[str, Any], mu: float) -> np.ndarray:
    """Step 2 of `set_timesteps`: shift float32 sigmas towards the noisy end, staying in float32.

    The scheduler does this on a float32 numpy array with Python-float constants; numpy casts those
    constants to float32 before each operation, so we spell the casts out to make the precision explicit
    (and to stay right under numpy 2's promotion rules too).
    """
    one = np.float32(1.0)
    if options["use_dynamic_shifting"]:
        # time_shift(mu, sigma=1.0, t): exp(mu) / (exp(mu) + (1/t - 1) ** 1.0) or the linear variant with mu.
        # At t = 1 the power is 0 and the result is exactly 1, so the first sigma stays 1.
        m = np.float32(math.exp(mu) if options["time_shift_type"] == "exponential" else mu)
        return m / (m + (one / sigmas - one) ** np.float32(1.0))
    shift = np.float32(options["shift"])
    return shift * sigmas / (one + (np.float32(options["shift"] - 1)) * sigmas)


def schedule(
    scheduler_config: Mapping[str, Any], image_seq_len: int, num_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps [steps], sigmas [steps + 1]) as float32, bit-identical to the klein pipeline's scheduler.

    Reproduces `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace, mu=empirical_mu)`:
    shift the sigmas, timesteps = sigmas * num_train_timesteps (in float32), and append a terminal sigma 0
    that the last Euler step lands on. `timesteps[i]` is the `t` the pipeline's loop sees.
    """
    options = scheduler_options(scheduler_config)
    mu = compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
    sigmas = _shift_sigmas(base_sigmas(num_steps), options, mu).astype(np.float32, copy=False)
    timesteps = sigmas * np.float32(options["num_train_timesteps"])
    sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
    return timesteps.astype(np.float32, copy=False), sigmas


def transformer_timestep(t: np.float32 | float, batch: int) -> np.ndarray:
    """The DiT's `timestep` input: the scheduler's float32 t expanded to the batch, divided by 1000 in float32."""
    return np.full((batch,), t, dtype=np.float32) / TRANSFORMER_TIMESTEP_DIVISOR


# ------------------------------------------------------------------------------------------------ noise


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """[C, h, w] channel-first latents -> [h*w, C] tokens, row-major over the grid (`_pack_latents`)."""
    channels, rows, cols = latents.shape
    return np.ascontiguousarray(latents.reshape(channels, rows * cols).T)


def initial_noise(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    """The pipeline's starting latents for `generator=torch.Generator("cpu").manual_seed(seed)`, packed.

    `prepare_latents` draws `randn_tensor((1, C, h, w), generator, dtype=float32)` in one call - one draw of
    the whole channel-first tensor, so the order of the draw (and therefore the seed's picture) depends on
    that layout - and then packs it to tokens. Only torch's CPU generator gives the same numbers, so this is
    the one place that needs torch. Returns float32 [h*w, C].
    """
    import torch

    rows, cols = latent_grid(width, height)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn((1, channels, rows, cols), generator=generator, dtype=torch.float32)
    return pack_latents(noise[0].numpy())


def tokens_to_grid(tokens: np.ndarray, width: int, height: int) -> np.ndarray:
    """[h*w, C] tokens -> [h, w, C], the VAE decoder's input layout.

    The pipeline scatters tokens by their ids (`_unpack_latents_with_ids`); since the noise ids are the grid
    in row-major order, that scatter is this reshape.
    """
    rows, cols = latent_grid(width, height)
    if tokens.shape[0] != rows * cols:
        raise ValueError(f"{tokens.shape[0]} tokens do not fill a {rows}x{cols} grid for {width}x{height}")
    return np.ascontiguousarray(tokens.reshape(rows, cols, tokens.shape[1]))


# ------------------------------------------------------------------------------------------ position ids


def _grid_ids(t: int, rows: int, cols: int) -> np.ndarray:
    """(t, row, col, 0) for every cell of a rows x cols grid, row-major: torch.cartesian_prod's order."""
    r, c = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    ids = np.zeros((rows * cols, 4), dtype=np.int64)
    ids[:, 0] = t
    ids[:, 1] = r.ravel()
    ids[:, 2] = c.ravel()
    return ids


def latent_ids(width: int, height: int) -> np.ndarray:
    """Noise-token ids, int64 [h*w, 4]: (0, row, col, 0) (`_prepare_latent_ids`)."""
    rows, cols = latent_grid(width, height)
    return _grid_ids(0, rows, cols)


def reference_ids(grids: Sequence[tuple[int, int]]) -> np.ndarray:
    """Reference-token ids, int64 [sum h_i*w_i, 4]: (10 + 10*i, row, col, 0) (`_prepare_image_ids`).

    `grids` are the (rows, cols) token grids of the references in order. Each reference has its own t, so
    the DiT's rotary embedding tells the references apart and from the image being generated (t = 0).
    """
    parts = [_grid_ids(REFERENCE_T_SCALE + REFERENCE_T_SCALE * i, r, c) for i, (r, c) in enumerate(grids)]
    return np.concatenate(parts) if parts else np.zeros((0, 4), dtype=np.int64)


def text_ids(length: int = TEXT_TOKENS) -> np.ndarray:
    """Text-token ids, int64 [length, 4]: (0, 0, 0, l) for l in 0..length-1 (`_prepare_text_ids`)."""
    ids = np.zeros((length, 4), dtype=np.int64)
    ids[:, 3] = np.arange(length, dtype=np.int64)
    return ids


# --------------------------------------------------------------------------------------- step and guidance


def euler_step(sample: np.ndarray, velocity: np.ndarray, sigma: np.float32, sigma_next: np.float32) -> np.ndarray:
    """`FlowMatchEulerDiscreteScheduler.step` (deterministic branch): prev = sample + (sigma_next - sigma) * v.

    The scheduler upcasts to float32 and computes dt first, then one multiply and one add, each rounded to
    float32; the same order here gives the same bits.
    """
    dt = np.float32(sigma_next) - np.float32(sigma)
    return sample.astype(np.float32, copy=False) + dt * velocity.astype(np.float32, copy=False)


def use_cfg(is_distilled: bool, guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs: `guidance_scale > 1 and not is_distilled` (the pipeline's rule).

    Step-distilled klein checkpoints (model_index.json "is_distilled": true) ignore guidance_scale.
    """
    return guidance_scale > 1 and not is_distilled


def cfg_combine(cond: np.ndarray, uncond: np.ndarray, guidance_scale: float) -> np.ndarray:
    """`uncond + scale * (cond - uncond)`, in float32 as torch does it (the scale rounded to float32 first)."""
    return uncond + np.float32(guidance_scale) * (cond - uncond)


# ---------------------------------------------------------------------------------------------- the loop

# transformer(hidden_states [B,S,C], encoder_hidden_states [B,512,D], timestep [B], img_ids [S,4],
#             txt_ids [512,4]) -> velocity [B,S,C]
Transformer = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _as_embeds(embeds: np.ndarray, name: str) -> np.ndarray:
    embeds = np.asarray(embeds, dtype=np.float32)
    if embeds.ndim == 2:
        embeds = embeds[None]
    if embeds.ndim != 3 or embeds.shape[0] != 1:
        raise ValueError(f"{name} must be [1, L, D] or [L, D], got {embeds.shape}")
    return embeds


def _reference_inputs(
    references: Sequence[np.ndarray], reference_grids: Sequence[tuple[int, int]] | None, channels: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Concatenate the reference tokens and work out each one's grid.

    A reference given as [h_i, w_i, C] carries its grid; one given as [h_i*w_i, C] needs its (rows, cols)
    from `reference_grids`, because the ids depend on the grid's shape, not just its size.
    """
    if reference_grids is not None and len(reference_grids) != len(references):
        raise ValueError(f"{len(references)} references but {len(reference_grids)} reference grids")
    tokens, grids = [], []
    for i, ref in enumerate(references):
        ref = np.asarray(ref, dtype=np.float32)
        if ref.ndim == 3:
            grid = (ref.shape[0], ref.shape[1])
            ref = ref.reshape(-1, ref.shape[2])
        elif ref.ndim == 2:
            if reference_grids is None:
                raise ValueError("references given as [N, C] tokens need reference_grids")
            grid = tuple(int(x) for x in reference_grids[i])
        else:
            raise ValueError(f"reference {i} must be [h, w, C] or [h*w, C], got {ref.shape}")
        if reference_grids is not None and tuple(reference_grids[i]) != grid:
            raise ValueError(f"reference {i} is a {grid} grid but reference_grids says {reference_grids[i]}")
        if ref.shape != (grid[0] * grid[1], channels):
            raise ValueError(f"reference {i} has shape {ref.shape}, expected {(grid[0] * grid[1], channels)}")
        tokens.append(ref)
        grids.append(grid)
    if not tokens:
        return np.zeros((0, channels), dtype=np.float32), []
    return np.concatenate(tokens), grids


def sample(
    transformer: Transformer,
    prompt_embeds: np.ndarray,
    *,
    width: int,
    height: int,
    seed: int,
    num_steps: int,
    scheduler_config: Mapping[str, Any],
    channels: int,
    references: Sequence[np.ndarray] = (),
    reference_grids: Sequence[tuple[int, int]] | None = None,
    guidance_scale: float = 1.0,
    do_cfg: bool = False,
    negative_prompt_embeds: np.ndarray | None = None,
    step_callback: Callable[[int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Run the whole klein denoising loop; return the final latents, float32 [h, w, C].

    `channels` is the DiT's in_channels (packed channels per token). With `do_cfg` (see `use_cfg`), the
    transformer is called once per step with batch 2, conditional first, and `negative_prompt_embeds` (the
    pipeline encodes "") is required. Reference tokens are appended after the noise tokens on every call and
    never updated; only the noise part of the velocity is used. `step_callback(i, latents)`, if given, sees
    the [h*w, C] tokens after each step (for progress or cancellation).
    """
    rows, cols = latent_grid(width, height)
    n_noise = rows * cols
    prompt_embeds = _as_embeds(prompt_embeds, "prompt_embeds")
    if do_cfg:
        if negative_prompt_embeds is None:
            raise ValueError("classifier-free guidance needs negative_prompt_embeds")
        negative_prompt_embeds = _as_embeds(negative_prompt_embeds, "negative_prompt_embeds")
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds {negative_prompt_embeds.shape} != {prompt_embeds.shape}")
        encoder_hidden_states = np.concatenate([prompt_embeds, negative_prompt_embeds])
    else:
        encoder_hidden_states = prompt_embeds
    batch = encoder_hidden_states.shape[0]

    ref_tokens, grids = _reference_inputs(references, reference_grids, channels)
    img_ids = np.concatenate([latent_ids(width, height), reference_ids(grids)])
    txt_ids = text_ids(prompt_embeds.shape[1])
    # mu depends on the noise tokens only: the pipeline takes image_seq_len before adding references.
    timesteps, sigmas = schedule(scheduler_config, image_seq_len=n_noise, num_steps=num_steps)

    latents = initial_noise(width, height, channels, seed)
    for i, t in enumerate(timesteps):
        # The same tokens for the conditional and the unconditional row; a real (writable) copy, not a view,
        # because the DiT callable may hand it to torch or a transport that wants to own its buffer.
        hidden = np.repeat(np.concatenate([latents, ref_tokens])[None], batch, axis=0)
        velocity = np.asarray(
            transformer(hidden, encoder_hidden_states, transformer_timestep(t, batch), img_ids, txt_ids),
            dtype=np.float32,
        )
        if velocity.shape != hidden.shape:
            raise ValueError(f"transformer returned {velocity.shape}, expected {hidden.shape}")
        velocity = velocity[:, :n_noise]
        v = cfg_combine(velocity[0], velocity[1], guidance_scale) if do_cfg else velocity[0]
        latents = euler_step(latents, v, sigmas[i], sigmas[i + 1])
        if step_callback is not None:
            step_callback(i, latents)
    return tokens_to_grid(latents, width, height)


@dataclass
class Sampler:
    """What the Triton sampler model builds once at load: the checkpoint's facts plus the DiT callable.

    `scheduler_config` is scheduler/scheduler_config.json, `is_distilled` comes from model_index.json and
    `channels` is the transformer's in_channels. The config is validated here, at load time, rather than on
    the first request.
    """

    transformer: Transformer
    scheduler_config: Mapping[str, Any]
    is_distilled: bool
    channels: int

    def __post_init__(self) -> None:
        scheduler_options(self.scheduler_config)

    def do_cfg(self, guidance_scale: float) -> bool:
        return use_cfg(self.is_distilled, guidance_scale)

    def __call__(
        self,
        prompt_embeds: np.ndarray,
        *,
        width: int,
        height: int,
        seed: int,
        num_steps: int,
        guidance_scale: float = 1.0,
        negative_prompt_embeds: np.ndarray | None = None,
        references: Sequence[np.ndarray] = (),
        reference_grids: Sequence[tuple[int, int]] | None = None,
        step_callback: Callable[[int, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """`sample(...)` with CFG decided as the pipeline decides it; returns latents [h, w, C]."""
        return sample(
            self.transformer, prompt_embeds, width=width, height=height, seed=seed, num_steps=num_steps,
            scheduler_config=self.scheduler_config, channels=self.channels, references=references,
            reference_grids=reference_grids, guidance_scale=guidance_scale,
            do_cfg=self.do_cfg(guidance_scale), negative_prompt_embeds=negative_prompt_embeds,
            step_callback=step_callback,
        )
