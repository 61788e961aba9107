"""The sampler's math: FLUX.2 [klein]'s denoising loop in torch on one device, with no transport in it.

The Triton "sampler" model wraps this module; the DiT and the VAE live in other models and are reached
through callables. Everything here reproduces diffusers' `Flux2KleinPipeline.__call__` (v0.42.1) and the
`FlowMatchEulerDiscreteScheduler` it drives, bit for bit where the pipeline is deterministic: the sigma
schedule, the initial noise, the position ids (position_ids.py), the Euler update and the guidance combination. The only
difference from the pipeline is that classifier-free guidance runs the transformer once with a batch of
two (conditional, unconditional) rather than twice with a batch of one.

The loop (`sample_batch`, and `sample` for one request) keeps its state - latents, reference tokens, text embeddings, ids, timesteps,
sigmas - as torch tensors on one `device`, so that on a GPU nothing leaves it between the sampler and the
DiT (the Triton glue passes the tensors on by DLPack). Every per-step operation is the torch operation the
pipeline itself runs, on the same device, so the results are the pipeline's on that device too (this
matters: on CUDA `t / 1000` is computed as `t * (1 / 1000)`, on the CPU as a true division). The small
helpers that build the schedule, the ids and the noise stay numpy (float32 / int64), bit-identical to the
pipeline's CPU tensors; the loop converts their results to the device once per request.

Shapes at the boundary (float32 unless said otherwise; h, w = `latent_grid(width, height)`):
  noise / latent tokens   [h*w, C]       C = transformer in_channels (128 for the real klein, 32 tiny)
  reference tokens        [h_i*w_i, C]   per reference image, as `prepare_image_latents` packs them
  prompt embeds           [1, 512, D]    (or [512, D])
  final latents           [h, w, C]      the packed tokens reshaped row-major onto the token grid
  position ids            int64 [N, 4]   (t, row, col, l)

(Over 400 lines: the loop and the one pure helper per tensor fact it is built from - schedule, noise, Euler
step, guidance, inpainting's blend - each tested against the pipeline's own piece, read together.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from flux2_klein.contract import strength_steps  # noqa: F401 - the loop's cut, stated with the contract
from flux2_klein.position_ids import latent_ids, reference_ids, text_ids  # the pipeline's, bit for bit
from flux2_klein.sizes import PIXELS_PER_TOKEN_SIDE, latent_grid

# The pipeline hands the transformer `timestep / 1000` with a literal 1000, whatever the scheduler's
# num_train_timesteps; the transformer multiplies by 1000 again inside.
TRANSFORMER_TIMESTEP_DIVISOR = np.float32(1000.0)

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


def transformer_timesteps(timesteps: torch.Tensor, batch: int) -> torch.Tensor:
    """Every step's DiT `timestep` input at once: float32 [steps, batch], row i for step i.

    `timesteps` is the float32 schedule on the loop's device. The pipeline computes
    `t.expand(B).to(float32) / 1000` with the scheduler's t on its device; this is the same elementwise
    torch division by the literal 1000 on the same device, so it gives the pipeline's bits there too
    (CUDA divides by a scalar as a multiplication by its float32 reciprocal, the CPU divides exactly).
    """
    timesteps = timesteps.to(torch.float32)
    return timesteps[:, None].expand(timesteps.shape[0], batch) / int(TRANSFORMER_TIMESTEP_DIVISOR)


def step_sizes(sigmas: torch.Tensor) -> torch.Tensor:
    """The Euler steps' dt = sigma_next - sigma, float32 [steps], from the float32 sigmas [steps + 1].

    The scheduler subtracts two float32 0-d tensors of its `sigmas` on the device; an elementwise float32
    subtraction gives the same bits.
    """
    sigmas = sigmas.to(torch.float32)
    return sigmas[1:] - sigmas[:-1]


# ------------------------------------------------------------------------------------------------ noise


def initial_noise_tensor(
    width: int, height: int, channels: int, seed: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The pipeline's starting latents for `generator=torch.Generator("cpu").manual_seed(seed)`, packed,
    as a contiguous float32 [h*w, C] tensor on `device`.

    `prepare_latents` draws `randn_tensor((1, C, h, w), generator, dtype=float32)` in one call - one draw of
    the whole channel-first tensor, so the order of the draw (and therefore the seed's picture) depends on
    that layout - and then packs it to tokens. With a CPU generator `randn_tensor` draws on the CPU and
    moves the result to the pipeline's device, whatever that is; so does this, so a seed gives the same
    picture on every device.
    """
    rows, cols = latent_grid(width, height)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = torch.randn((1, channels, rows, cols), generator=generator, dtype=torch.float32)
    return noise[0].reshape(channels, rows * cols).T.contiguous().to(device)


def tokens_to_grid(tokens: np.ndarray | torch.Tensor, width: int, height: int) -> np.ndarray | torch.Tensor:
    """[h*w, C] tokens -> [h, w, C], the VAE decoder's input layout; numpy in, numpy out, torch in, torch out.

    The pipeline scatters tokens by their ids (`_unpack_latents_with_ids`); since the noise ids are the grid
    in row-major order, that scatter is this reshape.
    """
    rows, cols = latent_grid(width, height)
    if tokens.shape[0] != rows * cols:
        raise ValueError(f"{tokens.shape[0]} tokens do not fill a {rows}x{cols} grid for {width}x{height}")
    grid = tokens.reshape(rows, cols, tokens.shape[1])
    return grid.contiguous() if isinstance(grid, torch.Tensor) else np.ascontiguousarray(grid)


# --------------------------------------------------------------------------------------- step and guidance


def use_cfg(is_distilled: bool, guidance_scale: float) -> bool:
    """Whether classifier-free guidance runs: `guidance_scale > 1 and not is_distilled` (the pipeline's rule).

    Step-distilled klein checkpoints (model_index.json "is_distilled": true) ignore guidance_scale.
    """
    return guidance_scale > 1 and not is_distilled


def euler_step_torch(sample: torch.Tensor, velocity: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """The scheduler's deterministic step `sample + dt * velocity` in float32, as a new tensor.

    `dt` is the float32 0-d `sigma_next - sigma` (see `step_sizes`) on the tensors' device, as in the
    scheduler. One rounded multiply, then one rounded add (never a fused multiply-add), as the scheduler's
    two separate torch operations do; the add is done in place on the fresh product, which is the same
    sum since float addition is commutative.
    """
    step = velocity.to(torch.float32) * dt
    return step.add_(sample.to(torch.float32))


def cfg_combine_torch(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float | torch.Tensor) -> torch.Tensor:
    """The pipeline's `uncond + guidance_scale * (cond - uncond)` in float32, as a new tensor.

    A Python-float scale meets a float32 tensor, so torch rounds it to float32 and multiplies in float32,
    on any device; a float32 tensor of scales (one per batch row, broadcast) gives the same bits row by row.
    The multiply and the add run in place on the fresh difference: the same three roundings.
    """
    combined = cond - uncond
    combined.mul_(guidance_scale if isinstance(guidance_scale, torch.Tensor) else float(guidance_scale))
    return combined.add_(uncond)


# ------------------------------------------------------------------------------------------- inpainting
# Flux2KleinInpaintPipeline (diffusers v0.42.1, pipelines/flux2/pipeline_flux2_klein_inpaint.py) on top of
# the loop above: the schedule is built for all steps and cut by strength (contract.strength_steps), the
# start is the picture's latents noised to the first sigma kept, and after every Euler step the kept part of
# the picture (mask 0) is put back, noised to the next sigma (clean after the last step).


def mask_tokens(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The binarized pixel mask [H, W] (0 keep, 1 repaint) as the pipeline's per-token mask, float32 [h*w, 1]
    on the CPU: `prepare_mask_latents`' bilinear interpolation (align_corners False) straight to the token
    grid, then packed row-major. The pipeline interpolates on the mask's device, which is the CPU (the mask
    processor makes it there); so does this."""
    mask = torch.as_tensor(np.asarray(mask, dtype=np.float32) if not isinstance(mask, torch.Tensor) else mask)
    mask = mask.to(device="cpu", dtype=torch.float32)
    height, width = mask.shape
    grid = (height // PIXELS_PER_TOKEN_SIDE, width // PIXELS_PER_TOKEN_SIDE)
    tokens = torch.nn.functional.interpolate(mask[None, None], size=grid, mode="bilinear")
    return tokens.reshape(1, grid[0] * grid[1]).T.contiguous()


def scale_noise_torch(sample: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The scheduler's `scale_noise`: `sigma * noise + (1.0 - sigma) * sample` in float32, with `sigma` the
    float32 sigma of the step (a 0-d tensor on the device), the same four roundings in the same order."""
    return sigma * noise + (1.0 - sigma) * sample


def blend_torch(latents: torch.Tensor, kept: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pipeline's `(1 - mask) * kept + mask * latents` (mask [.., h*w, 1] broadcast over channels)."""
    return (1 - mask) * kept + mask * latents


# ---------------------------------------------------------------------------------------------- the loop

# transformer(hidden_states [B,S,C], encoder_hidden_states [B,512,D], timestep [B] float32,
#             img_ids [S,4] int64, txt_ids [512,4] int64) -> velocity [B,S,C]
# All inputs are torch tensors on the loop's device, hidden and encoder states in the loop's `dit_dtype`
# (float32 unless the DiT's boundary is declared bf16); the velocity may be a torch tensor (on any device,
# of any float dtype: it is moved and cast to float32) or, for convenience, a numpy array.
Transformer = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | np.ndarray"
]


@dataclass
class Job:
    """One request's share of a batched denoising loop: what differs between requests of the same shape.

    prompt_embeds [1, L, D] or [L, D]; negative_prompt_embeds likewise, required when the batch runs
    classifier-free guidance; references: each reference's tokens, [h_i*w_i, C] or [h_i, w_i, C].
    image: inpainting / image-to-image, the picture's tokens [h*w, C] (the VAE encoder's, at the output size):
    the start of the loop, what the mask keeps, and the first condition (before the references); mask: its
    `mask_tokens` [h*w, 1] (None: all repainted, which is the pipeline with a white mask).
    """

    prompt_embeds: np.ndarray | torch.Tensor
    seed: int
    guidance_scale: float = 1.0
    negative_prompt_embeds: np.ndarray | torch.Tensor | None = None
    references: Sequence[np.ndarray | torch.Tensor] = ()
    image: np.ndarray | torch.Tensor | None = None
    mask: np.ndarray | torch.Tensor | None = None


@dataclass(frozen=True)
class Shape:
    """What requests must share to run in one batched loop: one schedule, one set of position ids."""

    width: int
    height: int
    num_steps: int
    do_cfg: bool
    reference_grids: tuple[tuple[int, int], ...] = ()
    # With an image (inpainting, image-to-image): the first step run after strength's cut; None without one.
    start_step: int | None = None
    # The LoRAs every DiT call of the loop runs with (lora_library.parse_choice's pairs; () for none): one
    # call, one set of adapters.
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def rows_per_job(self) -> int:
        """DiT batch rows each request takes: its prompt, and its unconditional twin under guidance."""
        return 2 if self.do_cfg else 1


def plan_batches(shapes: Sequence[Shape], max_rows: int) -> list[list[int]]:
    """Group request indices into batches of equal `Shape` whose DiT rows fit `max_rows`; oldest first.

    Order inside a batch and between batches follows the requests' order, so the first request of a group
    is never overtaken by a later one of another shape. A request that alone exceeds `max_rows` still gets a
    batch of its own (the DiT then answers for it, or fails for it alone).
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    batches: list[list[int]] = []
    open_batch: dict[Shape, list[int]] = {}
    for i, shape in enumerate(shapes):
        current = open_batch.get(shape)
        if current is None or (len(current) + 1) * shape.rows_per_job > max_rows:
            current = []
            batches.append(current)
            open_batch[shape] = current
        current.append(i)
    return batches


def _tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`x` as a `dtype` tensor on `device`: a torch tensor already there is returned as it is, a numpy array
    on the CPU is wrapped without a copy where its dtype already fits (a read-only array is copied once, as
    torch cannot wrap it)."""
    if not isinstance(x, torch.Tensor):
        array = np.asarray(x)
        if not array.flags.writeable:
            array = array.copy()
        x = torch.from_numpy(array)
    return x.to(device=device, dtype=dtype)


def _as_embeds(embeds: np.ndarray | torch.Tensor, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    embeds = _tensor(embeds, dtype, device)
    if embeds.ndim == 2:
        embeds = embeds[None]
    if embeds.ndim != 3 or embeds.shape[0] != 1:
        raise ValueError(f"{name} must be [1, L, D] or [L, D], got {tuple(embeds.shape)}")
    return embeds


def _reference_inputs(
    references: Sequence[np.ndarray | torch.Tensor],
    reference_grids: Sequence[tuple[int, int]] | None,
    channels: int,
    device: torch.device,
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Each reference as float32 [h_i*w_i, C] tokens on `device`, and each one's grid.

    A reference given as [h_i, w_i, C] carries its grid; one given as [h_i*w_i, C] needs its (rows, cols)
    from `reference_grids`, because the ids depend on the grid's shape, not just its size.
    """
    if reference_grids is not None and len(reference_grids) != len(references):
        raise ValueError(f"{len(references)} references but {len(reference_grids)} reference grids")
    tokens, grids = [], []
    for i, ref in enumerate(references):
        ref = _tensor(ref, torch.float32, device)
        if ref.ndim == 3:
            grid = (int(ref.shape[0]), int(ref.shape[1]))
            ref = ref.reshape(-1, ref.shape[2])
        elif ref.ndim == 2:
            if reference_grids is None:
                raise ValueError("references given as [N, C] tokens need reference_grids")
            grid = tuple(int(x) for x in reference_grids[i])
        else:
            raise ValueError(f"reference {i} must be [h, w, C] or [h*w, C], got {tuple(ref.shape)}")
        if reference_grids is not None and tuple(reference_grids[i]) != grid:
            raise ValueError(f"reference {i} is a {grid} grid but reference_grids says {reference_grids[i]}")
        if tuple(ref.shape) != (grid[0] * grid[1], channels):
            raise ValueError(
                f"reference {i} has shape {tuple(ref.shape)}, expected {(grid[0] * grid[1], channels)}"
            )
        tokens.append(ref)
        grids.append(grid)
    return tokens, grids


def _velocity(output: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The transformer's output as a float32 tensor on `device` (no copy when it already is one)."""
    velocity = _tensor(output, torch.float32, device)
    if tuple(velocity.shape) != shape:
        raise ValueError(f"transformer returned {tuple(velocity.shape)}, expected {shape}")
    return velocity


@torch.no_grad()
def sample_batch(
    transformer: Transformer,
    jobs: Sequence[Job],
    *,
    width: int,
    height: int,
    num_steps: int,
    scheduler_config: Mapping[str, Any],
    channels: int,
    do_cfg: bool = False,
    reference_grids: Sequence[tuple[int, int]] | None = None,
    step_callback: Callable[[int, torch.Tensor], None] | None = None,
    device: str | torch.device = "cpu",
    dit_dtype: torch.dtype = torch.float32,
    start_step: int | None = None,
) -> list[torch.Tensor]:
    """Run the klein denoising loop for several requests of one shape at once; return each request's final
    latents, a float32 [h, w, C] tensor on `device` (contiguous, owned by the caller).

    Every request keeps what makes its picture its own - prompt, seed (the noise is drawn on the CPU from
    `torch.Generator("cpu").manual_seed(seed)` and moved, as the pipeline does with a CPU generator),
    guidance scale, references - while the schedule and position ids, which depend only on the shape, are
    shared. The transformer is called once per step with every request's rows: prompts first, then (with
    `do_cfg`) each request's unconditional row in the same order. Apart from the DiT's batch size, each
    request's arithmetic is exactly what it would be alone.

    `reference_grids` (rows, cols) per reference are needed when references are given as [N, C] tokens;
    every job must have references of these grids. `hidden_states` is ONE buffer reused on every step (the
    latents are copied into its first h*w rows; the reference rows are written once): the callable must not
    modify its inputs and must copy `hidden_states` if it needs it after returning. The velocity it returns
    is read before the next call. `step_callback(i, latents [n, h*w, C])` sees the tokens after each step.
    `dit_dtype` is the dtype of the DiT's hidden and encoder states at its boundary (float32, or bf16 where
    the DiT computes in bf16 and its model declares a bf16 boundary); the Euler steps stay float32.

    `start_step` (inpainting / image-to-image: every job has an `image`) is strength's cut of the schedule
    (`strength_steps`): steps start_step..num_steps-1 of the full schedule run, from the picture noised to
    the first of them, and each job's mask (None: no blend, the pipeline's white mask) keeps its picture.
    """
    if not jobs:
        return []
    device = torch.device(device)
    rows, cols = latent_grid(width, height)
    n_noise, n = rows * cols, len(jobs)

    prompts = [_as_embeds(j.prompt_embeds, "prompt_embeds", device, dit_dtype) for j in jobs]
    states = prompts
    if do_cfg:
        if any(j.negative_prompt_embeds is None for j in jobs):
            raise ValueError("classifier-free guidance needs negative_prompt_embeds")
        negatives = [_as_embeds(j.negative_prompt_embeds, "negative_prompt_embeds", device, dit_dtype) for j in jobs]
        for p, q in zip(prompts, negatives):
            if p.shape != q.shape:
                raise ValueError(f"negative_prompt_embeds {tuple(q.shape)} != prompt_embeds {tuple(p.shape)}")
        states = prompts + negatives
    if len({tuple(s.shape) for s in states}) != 1:
        raise ValueError(f"prompt embeddings of one batch must share a shape, got {sorted({tuple(s.shape) for s in states})}")
    encoder_hidden_states = torch.cat(states)
    batch = encoder_hidden_states.shape[0]

    refs = [_reference_inputs(j.references, reference_grids, channels, device) for j in jobs]
    images = None
    if start_step is not None:  # the picture is the first condition, at the noise's grid (t = 10)
        if any(j.image is None for j in jobs):
            raise ValueError("start_step is for jobs with an image (inpainting, image-to-image)")
        if not 0 <= start_step < num_steps:
            raise ValueError(f"start_step must be 0..{num_steps - 1}, got {start_step}")
        images = [_tensor(j.image, torch.float32, device).reshape(n_noise, channels) for j in jobs]
        refs = [([image, *tokens], [(rows, cols), *g]) for image, (tokens, g) in zip(images, refs)]
    elif any(j.image is not None for j in jobs):
        raise ValueError("jobs with an image need start_step")
    grids = refs[0][1]
    if any(g != grids for _, g in refs):
        raise ValueError(f"references of one batch must share their grids, got {[g for _, g in refs]}")
    n_tokens = n_noise + sum(r * c for r, c in grids)
    img_ids = torch.from_numpy(np.concatenate([latent_ids(width, height), reference_ids(grids)])).to(device)
    txt_ids = torch.from_numpy(text_ids(prompts[0].shape[1])).to(device)
    # mu depends on the noise tokens only: the pipeline takes image_seq_len before adding references.
    timesteps, sigmas = schedule(scheduler_config, image_seq_len=n_noise, num_steps=num_steps)
    dit_timesteps = transformer_timesteps(torch.from_numpy(timesteps).to(device), batch)  # [steps, B]
    dts = step_sizes(torch.from_numpy(sigmas).to(device))  # [steps]
    scales = None
    if do_cfg:  # each request's scale, rounded to float32 as torch rounds a Python float
        scales = torch.tensor([float(j.guidance_scale) for j in jobs], dtype=torch.float32, device=device)[:, None, None]

    # The DiT's input buffer: request i's tokens in row i (and, under guidance, in row n + i too); the
    # reference rows are written here once, the noise rows on every step.
    hidden = torch.empty((batch, n_tokens, channels), dtype=dit_dtype, device=device)
    for i, (tokens, _) in enumerate(refs):
        offset = n_noise
        for ref in tokens:
            hidden[i::n, offset : offset + ref.shape[0]] = ref.to(dit_dtype)
            offset += ref.shape[0]
    del refs

    latents = torch.stack([initial_noise_tensor(width, height, channels, j.seed, device) for j in jobs])
    first, masks = 0, None
    if images is not None:
        first = start_step
        sigma_at = torch.from_numpy(sigmas).to(device)  # the scheduler's float32 sigmas, on the device
        noise, pictures = latents, torch.stack(images)
        latents = scale_noise_torch(pictures, noise, sigma_at[first])
        if any(j.mask is not None for j in jobs):  # a job without a mask in a masked batch: all ones
            masks = torch.stack([torch.ones((n_noise, 1), dtype=torch.float32, device=device) if j.mask is None
                                 else _tensor(j.mask, torch.float32, device).reshape(n_noise, 1) for j in jobs])
    for i in range(first, num_steps):
        hidden[:, :n_noise] = latents.repeat(batch // n, 1, 1) if do_cfg else latents
        output = transformer(hidden, encoder_hidden_states, dit_timesteps[i], img_ids, txt_ids)
        velocity = _velocity(output, tuple(hidden.shape), device)
        if do_cfg:
            v = cfg_combine_torch(velocity[:n, :n_noise], velocity[n:, :n_noise], scales)
        else:
            v = velocity[:, :n_noise]
        latents = euler_step_torch(latents, v, dts[i])
        if masks is not None:  # the kept part: the picture noised to the next sigma, clean after the last step
            kept = pictures if i == num_steps - 1 else scale_noise_torch(pictures, noise, sigma_at[i + 1])
            latents = blend_torch(latents, kept, masks)
        if step_callback is not None:
            step_callback(i - first, latents)
    return [tokens_to_grid(latents[k], width, height) for k in range(n)]


def sample(
    transformer: Transformer,
    prompt_embeds: np.ndarray | torch.Tensor,
    *,
    width: int,
    height: int,
    seed: int,
    num_steps: int,
    scheduler_config: Mapping[str, Any],
    channels: int,
    references: Sequence[np.ndarray | torch.Tensor] = (),
    reference_grids: Sequence[tuple[int, int]] | None = None,
    guidance_scale: float = 1.0,
    do_cfg: bool = False,
    negative_prompt_embeds: np.ndarray | torch.Tensor | None = None,
    step_callback: Callable[[int, torch.Tensor], None] | None = None,
    device: str | torch.device | None = None,
    image: np.ndarray | torch.Tensor | None = None,
    mask: np.ndarray | torch.Tensor | None = None,
    start_step: int | None = None,
) -> torch.Tensor:
    """One request's loop: `sample_batch` with a single job; returns float32 latents [h, w, C] on `device`
    (by default prompt_embeds' device when it is a tensor, else the CPU). `step_callback(i, latents)` sees
    the [h*w, C] tokens after each step."""
    if device is None:
        device = prompt_embeds.device if isinstance(prompt_embeds, torch.Tensor) else "cpu"
    job = Job(prompt_embeds, seed, guidance_scale, negative_prompt_embeds, references, image, mask)
    callback = None if step_callback is None else (lambda i, latents: step_callback(i, latents[0]))
    (latents,) = sample_batch(transformer, [job], width=width, height=height, num_steps=num_steps,
                              scheduler_config=scheduler_config, channels=channels, do_cfg=do_cfg,
                              reference_grids=reference_grids, step_callback=callback, device=device,
                              start_step=start_step)
    return latents
