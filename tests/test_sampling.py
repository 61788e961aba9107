"""flux2_klein.sampling against diffusers' own Flux2KleinPipeline and FlowMatchEulerDiscreteScheduler.

The pieces (schedule, noise, ids, Euler step, guidance) must be bit-identical to diffusers; the whole loop,
which runs in torch on a device (here the CPU) and calls the tiny checkpoint's torch transformer with torch
tensors, must give the pipeline's image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import oracles
from flux2_klein import sampling
from flux2_klein.sizes import SIZES, image_tokens, latent_grid
from flux2_klein.tiny import SCHEDULER_CONFIG, model_index

# The extremes of the 17 sizes, the square default and one in between.
TEST_SIZES = [(672, 1568), (1568, 672), (1024, 1024), (944, 1104)]
STEP_COUNTS = [1, 4, 28, 50]
# Every kind of INT64 seed the contract allows: negative, zero, one past float64's exact integers, and both
# INT64 extremes.
SEEDS = [-7, 0, 42, 2**53 + 1, 2**63 - 1, -(2**63)]
PROMPT = "a red fox in the snow, golden light"
MAX_PIXEL_DIFF = 2


def _scheduler(config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(dict(config))


def _diffusers_schedule(config, width, height, steps):
    """What the klein pipeline's step 6 leaves in its scheduler, built with diffusers' own functions."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    scheduler = _scheduler(config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = compute_empirical_mu(image_seq_len=image_tokens(width, height), num_steps=steps)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler


def _ckpt_scheduler_config(ckpt):
    return json.loads((ckpt / "scheduler" / "scheduler_config.json").read_text())


# ----------------------------------------------------------------------------------------------- schedule


def test_sizes_cover_extremes():
    assert all(size in SIZES for size in TEST_SIZES)


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("size", TEST_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_schedule_bit_identical(tiny_ckpt, size, steps):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    width, height = size
    config = _ckpt_scheduler_config(tiny_ckpt)  # as saved, with _class_name and _diffusers_version
    reference = _diffusers_schedule(config, width, height, steps)
    seq_len = image_tokens(width, height)

    assert sampling.compute_empirical_mu(seq_len, steps) == compute_empirical_mu(seq_len, steps)
    assert np.array_equal(sampling.base_sigmas(steps), np.linspace(1.0, 1 / steps, steps).astype(np.float32))
    timesteps, sigmas = sampling.schedule(config, seq_len, steps)
    assert timesteps.dtype == np.float32 and sigmas.dtype == np.float32
    assert timesteps.shape == (steps,) and sigmas.shape == (steps + 1,)
    assert np.array_equal(timesteps, reference.timesteps.numpy())
    assert np.array_equal(sigmas, reference.sigmas.numpy())
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0

    # The DiT's timestep input: `t.expand(B).to(float32) / 1000`, as the pipeline computes it, both from the
    # numpy helper and from the table the torch loop builds once per request.
    for batch in (1, 2):
        table = sampling.transformer_timesteps(torch.from_numpy(timesteps), batch)
        assert table.dtype == torch.float32 and table.shape == (steps, batch) and table.is_contiguous()
        for i, t in enumerate(reference.timesteps):
            expected = (t.expand(batch).to(torch.float32) / 1000).numpy()
            assert np.array_equal(oracles.transformer_timestep(timesteps[i], batch), expected)
            assert np.array_equal(table[i].numpy(), expected)
    # The Euler steps' dt, as the scheduler's step computes it from its sigmas.
    dts = sampling.step_sizes(torch.from_numpy(sigmas))
    assert dts.dtype == torch.float32 and dts.shape == (steps,)
    for i in range(steps):
        assert torch.equal(dts[i], reference.sigmas[i + 1] - reference.sigmas[i])


@pytest.mark.parametrize(
    "override",
    [{"time_shift_type": "linear"}, {"use_dynamic_shifting": False}, {"use_dynamic_shifting": False, "shift": 1.0}],
    ids=["linear", "static-shift-3", "static-shift-1"],
)
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_schedule_other_shifts_bit_identical(override, steps):
    config = {**SCHEDULER_CONFIG, **override}
    for width, height in TEST_SIZES:
        reference = _diffusers_schedule(config, width, height, steps)
        timesteps, sigmas = sampling.schedule(config, image_tokens(width, height), steps)
        assert np.array_equal(timesteps, reference.timesteps.numpy())
        assert np.array_equal(sigmas, reference.sigmas.numpy())


def test_empirical_mu_long_sequences():
    """Above 4300 tokens the mu formula switches branch; the 17 sizes all stay below it."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    assert max(image_tokens(w, h) for w, h in SIZES) <= 4300
    for seq_len in (4300, 4301, 16384):
        for steps in STEP_COUNTS:
            assert sampling.compute_empirical_mu(seq_len, steps) == compute_empirical_mu(seq_len, steps)


def test_scheduler_defaults_match_diffusers():
    config = _scheduler({}).config
    assert set(sampling.SCHEDULER_DEFAULTS) == {k for k in config if not k.startswith("_")}
    for key, value in sampling.SCHEDULER_DEFAULTS.items():
        assert config[key] == value, key


@pytest.mark.parametrize(
    "override, error",
    [
        ({"shift_terminal": 0.1}, NotImplementedError),
        ({"use_karras_sigmas": True}, NotImplementedError),
        ({"use_exponential_sigmas": True}, NotImplementedError),
        ({"use_beta_sigmas": True}, NotImplementedError),
        ({"invert_sigmas": True}, NotImplementedError),
        ({"stochastic_sampling": True}, NotImplementedError),
        ({"use_flow_sigmas": True}, NotImplementedError),
        ({"time_shift_type": "cosine"}, ValueError),
        ({"some_future_option": 1}, ValueError),
        ({"_class_name": "EulerDiscreteScheduler"}, ValueError),
    ],
)
def test_unsupported_scheduler_options_raise(override, error):
    config = {**SCHEDULER_CONFIG, **override}
    with pytest.raises(error):
        sampling.schedule(config, 4096, 4)
    with pytest.raises(error):  # the whole loop refuses it before calling the DiT
        sampling.sample(lambda *a: pytest.fail("DiT called"), np.zeros((512, 48), np.float32), width=1024,
                        height=1024, seed=0, num_steps=4, scheduler_config=config, channels=32)


def test_falsy_unsupported_options_accepted():
    config = {**SCHEDULER_CONFIG, "shift_terminal": None, "use_flow_sigmas": False, "_class_name": None}
    timesteps, sigmas = sampling.schedule(config, 4096, 4)
    # accepted and ignored: the schedule is diffusers' for the plain config, to the bit
    reference = _diffusers_schedule(SCHEDULER_CONFIG, 1024, 1024, 4)
    assert np.array_equal(timesteps, reference.timesteps.numpy())
    assert np.array_equal(sigmas, reference.sigmas.numpy())


# -------------------------------------------------------------------------------------------------- noise


@pytest.mark.parametrize("channels", [32, 128])  # the tiny DiT's and the real klein's packed channels
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", TEST_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_initial_noise_and_latent_ids_bit_identical(tiny_pipe, size, seed, channels):
    width, height = size
    latents, ids = tiny_pipe.prepare_latents(
        batch_size=1, num_latents_channels=channels // 4, height=height, width=width, dtype=torch.float32,
        device=torch.device("cpu"), generator=torch.Generator("cpu").manual_seed(seed),
    )
    noise = oracles.initial_noise(width, height, channels, seed)
    assert noise.dtype == np.float32 and noise.flags.c_contiguous
    assert noise.shape == (image_tokens(width, height), channels)
    assert np.array_equal(noise, latents[0].numpy())
    tensor = sampling.initial_noise_tensor(width, height, channels, seed, device="cpu")
    assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()
    assert torch.equal(tensor, latents[0])
    assert sampling.latent_ids(width, height).dtype == np.int64
    assert np.array_equal(sampling.latent_ids(width, height), ids[0].numpy())


def test_noise_depends_on_seed():
    noise = {seed: sampling.initial_noise_tensor(1024, 1024, 32, seed) for seed in SEEDS + [1, 7, 2**53]}
    for a, b in [(0, 1), (-7, 7), (2**53, 2**53 + 1), (2**63 - 1, -(2**63))]:
        assert not torch.equal(noise[a], noise[b]), (a, b)
    # torch's CPU generator (mt19937) reads only the seed's low 32 bits, in diffusers as here (README says so)
    for a, b in [(1, 2**32 + 1), (0, -(2**63)), (-7, 2**32 - 7)]:
        assert torch.equal(sampling.initial_noise_tensor(256, 256, 32, a), sampling.initial_noise_tensor(256, 256, 32, b))


@pytest.mark.parametrize("size", TEST_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_tokens_to_grid_matches_unpack(tiny_pipe, size):
    width, height = size
    rows, cols = latent_grid(width, height)
    tokens = np.random.default_rng(0).standard_normal((rows * cols, 32)).astype(np.float32)
    ids = torch.from_numpy(sampling.latent_ids(width, height))[None]
    unpacked = tiny_pipe._unpack_latents_with_ids(torch.from_numpy(tokens)[None], ids, rows, cols)  # [1,C,h,w]
    grid = sampling.tokens_to_grid(tokens, width, height)
    assert grid.shape == (rows, cols, 32)
    assert np.array_equal(grid, unpacked[0].permute(1, 2, 0).numpy())
    grid_tensor = sampling.tokens_to_grid(torch.from_numpy(tokens), width, height)
    assert isinstance(grid_tensor, torch.Tensor) and grid_tensor.is_contiguous()
    assert torch.equal(grid_tensor, unpacked[0].permute(1, 2, 0))
    # and packing a channel-first grid is the pipeline's _pack_latents
    chw = unpacked[0].numpy()
    assert np.array_equal(oracles.pack_latents(chw), tiny_pipe._pack_latents(unpacked)[0].numpy())


# ---------------------------------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "grids",
    [[], [(64, 64)], [(16, 16), (42, 98), (4, 4)], [(98, 42), (8, 128), (128, 8), (64, 64)]],
    ids=["none", "one", "three", "four"],
)
def test_reference_ids_bit_identical(tiny_pipe, grids):
    ids = sampling.reference_ids(grids)
    assert ids.dtype == np.int64 and ids.shape == (sum(r * c for r, c in grids), 4)
    if not grids:
        return
    latents = [torch.zeros(1, 32, r, c) for r, c in grids]
    assert np.array_equal(ids, tiny_pipe._prepare_image_ids(latents)[0].numpy())
    assert sorted(set(ids[:, 0].tolist())) == [10 + 10 * i for i in range(len(grids))]


def test_text_ids_bit_identical(tiny_pipe):
    ids = sampling.text_ids()
    assert ids.dtype == np.int64 and ids.shape == (512, 4)
    assert np.array_equal(ids, tiny_pipe._prepare_text_ids(torch.zeros(1, 512, 48))[0].numpy())
    _, pipe_text_ids = tiny_pipe.encode_prompt(PROMPT, device="cpu")
    assert np.array_equal(ids, pipe_text_ids[0].numpy())


# ------------------------------------------------------------------------------------- step and guidance


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("size", [(672, 1568), (1024, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_euler_steps_bit_identical(size, steps):
    """A whole schedule of scheduler.step calls with random velocities, as the pipeline loop makes them."""
    width, height = size
    scheduler = _diffusers_schedule(SCHEDULER_CONFIG, width, height, steps)
    scheduler.set_begin_index(0)
    _, sigmas = sampling.schedule(SCHEDULER_CONFIG, image_tokens(width, height), steps)
    dts = sampling.step_sizes(torch.from_numpy(sigmas))
    rng = np.random.default_rng(steps)
    ours = oracles.initial_noise(width, height, 32, seed=steps)
    ours_torch = torch.from_numpy(ours.copy())
    theirs = torch.from_numpy(ours.copy())[None]
    for i, t in enumerate(scheduler.timesteps):
        velocity = (rng.standard_normal(ours.shape) * 3).astype(np.float32)
        theirs = scheduler.step(torch.from_numpy(velocity)[None], t, theirs, return_dict=False)[0]
        ours = oracles.euler_step(ours, velocity, sigmas[i], sigmas[i + 1])
        assert ours.dtype == np.float32
        assert np.array_equal(ours, theirs[0].numpy()), f"step {i}"
        before, v = ours_torch, torch.from_numpy(velocity)
        ours_torch = sampling.euler_step_torch(ours_torch, v, dts[i])
        assert ours_torch.dtype == torch.float32 and ours_torch is not before
        assert torch.equal(ours_torch, theirs[0]), f"torch step {i}"
        assert torch.equal(v, torch.from_numpy(velocity))  # the inputs are left alone


@pytest.mark.parametrize("scale", [1.0, 1.5, 3.3, 4.0, 7.77])
def test_cfg_combine_bit_identical(scale):
    rng = np.random.default_rng(1)
    cond, uncond = (rng.standard_normal((2, 4096, 32)) * 2).astype(np.float32)
    c, u = torch.from_numpy(cond)[None], torch.from_numpy(uncond)[None]
    expected = (u + scale * (c - u))[0].numpy()  # the pipeline's expression
    got = oracles.cfg_combine(cond, uncond, scale)
    assert got.dtype == np.float32
    assert np.array_equal(got, expected)
    got_torch = sampling.cfg_combine_torch(c[0], u[0], scale)
    assert got_torch.dtype == torch.float32
    assert np.array_equal(got_torch.numpy(), expected)
    assert np.array_equal(c[0].numpy(), cond) and np.array_equal(u[0].numpy(), uncond)  # inputs untouched


def test_use_cfg_follows_pipeline(tiny_pipe):
    for distilled in (True, False):
        for scale in (0.0, 1.0, 1.0001, 4.0):
            tiny_pipe._guidance_scale = scale
            with _is_distilled(tiny_pipe, distilled):
                assert sampling.use_cfg(distilled, scale) == tiny_pipe.do_classifier_free_guidance


class _is_distilled:
    def __init__(self, pipe, value):
        self.pipe, self.value = pipe, value

    def __enter__(self):
        self.old = self.pipe.config.is_distilled
        self.pipe.register_to_config(is_distilled=self.value)

    def __exit__(self, *exc):
        self.pipe.register_to_config(is_distilled=self.old)


# -------------------------------------------------------------------------------------------- end to end


class TorchTransformer:
    """The DiT interface over a diffusers Flux2Transformer2DModel: torch tensors in (checked), a torch tensor
    out (or a numpy array with `numpy_out`), every call's inputs recorded as numpy copies.

    The sampler reuses its hidden_states buffer from step to step, so the record copies it, as a real
    callable that kept it would have to.
    """

    def __init__(self, module, device="cpu", numpy_out=False):
        self.module = module
        self.device = torch.device(device)
        self.numpy_out = numpy_out
        self.calls = []
        self.hidden_buffers = set()

    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids):
        batch, seq = hidden_states.shape[:2]
        for x, dtype, shape in [
            (hidden_states, torch.float32, (batch, seq, self.module.config.in_channels)),
            (encoder_hidden_states, torch.float32, (batch, 512, encoder_hidden_states.shape[2])),
            (timestep, torch.float32, (batch,)),
            (img_ids, torch.int64, (seq, 4)),
            (txt_ids, torch.int64, (512, 4)),
        ]:
            assert isinstance(x, torch.Tensor) and x.dtype == dtype and tuple(x.shape) == shape
            assert x.device == self.device and x.is_contiguous() and not x.requires_grad
        self.hidden_buffers.add(hidden_states.data_ptr())
        self.calls.append(
            dict(hidden_states=hidden_states.numpy().copy(), timestep=timestep.numpy().copy(),
                 img_ids=img_ids.numpy().copy(), txt_ids=txt_ids.numpy().copy(), batch=batch)
        )
        with torch.no_grad():
            out = self.module(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False,
            )[0]
        return out.numpy() if self.numpy_out else out


def _record_transformer_inputs(pipe, calls: list):
    """Record what the pipeline itself feeds its transformer, call by call (a removable forward pre-hook)."""

    def hook(_module, _args, kwargs):
        calls.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    return pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def _decode(pipe, latents_hwc):
    """The pipeline's own decode path from our [h, w, C] latents: bn de-norm, unpatchify, VAE, postprocess."""
    latents = torch.as_tensor(latents_hwc).permute(2, 0, 1)[None]
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    latents = pipe._unpatchify_latents(latents * std + mean)
    with torch.no_grad():
        image = pipe.vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def _run_pipeline(pipe, steps=4, **kwargs):
    """The oracle: the pipeline's image, its final packed latents [h*w, C] and its transformer calls."""
    calls, final = [], {}

    def grab(_pipe, i, t, callback_kwargs):
        final["latents"] = callback_kwargs["latents"][0].clone()
        return {}

    handle = _record_transformer_inputs(pipe, calls)
    try:
        image = pipe(
            prompt=PROMPT, num_inference_steps=steps, output_type="pil", callback_on_step_end=grab,
            callback_on_step_end_tensor_inputs=["latents"], **kwargs,
        ).images[0]
    finally:
        handle.remove()
    return image, final["latents"].numpy(), calls


def _pixel_diff(a, b) -> int:
    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


def _assert_same_inputs(ours, theirs, n_noise, cfg=False):
    """Our calls carry the pipeline's timesteps, ids and (for batch 1) exactly its hidden states."""
    assert len(theirs) == len(ours) * (2 if cfg else 1)
    for i, call in enumerate(ours):
        pipe_call = theirs[2 * i if cfg else i]
        assert np.array_equal(call["timestep"][:1], pipe_call["timestep"].numpy())
        assert np.array_equal(call["img_ids"], pipe_call["img_ids"][0].numpy())
        assert np.array_equal(call["txt_ids"], pipe_call["txt_ids"][0].numpy())
        their_hidden = pipe_call["hidden_states"][0].numpy()
        if not cfg:  # batch 1 throughout: every step is bit-identical
            assert np.array_equal(call["hidden_states"][0], their_hidden), f"step {i}"
        else:
            assert np.array_equal(call["hidden_states"][0], call["hidden_states"][1])
            # Batch 2 against the pipeline's batch 1: the DiT's matmuls round differently per batch size and
            # each step carries the earlier steps' difference. Measured up to 1.6e-4 absolute, 2.2e-5 of the
            # largest value (an absolute 1e-4 held on one CPU, not on another); bound 1e-4 relative.
            err = float(np.abs(call["hidden_states"][0] - their_hidden).max())
            assert err <= 1e-4 * float(np.abs(their_hidden).max()), f"step {i}: {err}"
        assert np.array_equal(call["hidden_states"][0, n_noise:], their_hidden[n_noise:])  # references


@pytest.mark.parametrize("size, seed", [((1024, 1024), 0), ((1568, 672), 7)], ids=["1024x1024", "1568x672"])
def test_end_to_end_distilled(tiny_pipe, tiny_ckpt, size, seed):
    width, height = size
    pipe_image, pipe_latents, pipe_calls = _run_pipeline(
        tiny_pipe, width=width, height=height, guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    with torch.no_grad():
        prompt_embeds, _ = tiny_pipe.encode_prompt(PROMPT, device="cpu")
    dit = TorchTransformer(tiny_pipe.transformer)
    sampler = oracles.Sampler(
        transformer=dit, scheduler_config=_ckpt_scheduler_config(tiny_ckpt),
        is_distilled=model_index(tiny_ckpt)["is_distilled"], channels=tiny_pipe.transformer.config.in_channels,
    )
    latents = sampler(prompt_embeds.numpy(), width=width, height=height, seed=seed, num_steps=4)

    rows, cols = latent_grid(width, height)
    assert isinstance(latents, torch.Tensor) and latents.device.type == "cpu" and latents.is_contiguous()
    assert latents.dtype == torch.float32 and latents.shape == (rows, cols, 32)
    latents = latents.numpy()
    assert [c["batch"] for c in dit.calls] == [1] * 4
    assert len(dit.hidden_buffers) == 1  # one hidden_states buffer per request, reused by every step
    _assert_same_inputs(dit.calls, pipe_calls, rows * cols)
    latent_diff = float(np.abs(latents.reshape(rows * cols, -1) - pipe_latents).max())
    pixel_diff = _pixel_diff(_decode(tiny_pipe, latents), pipe_image)
    print(f"\ndistilled {width}x{height} seed {seed}: max latent diff {latent_diff}, max pixel diff {pixel_diff}")
    assert latent_diff == 0.0, f"max latent diff {latent_diff}"
    assert pixel_diff <= MAX_PIXEL_DIFF, f"max pixel diff {pixel_diff} (latents differ by {latent_diff})"

    # guidance_scale is ignored for distilled checkpoints, as in the pipeline (one step is enough to see it)
    assert not sampler.do_cfg(4.0)
    one_step = dict(width=width, height=height, seed=seed, num_steps=1)
    guided = sampler(prompt_embeds, guidance_scale=4.0, **one_step)
    assert torch.equal(guided, sampler(prompt_embeds, guidance_scale=1.0, **one_step))


@pytest.mark.parametrize("seed", SEEDS)
def test_whole_loop_equals_pipeline_for_every_int64_seed(tiny_pipe, tiny_ckpt, seed):
    """The seed reaches the picture only through the noise; here through the whole loop, at a small size
    (16x16 tokens, outside the 17 served sizes but a valid pipeline call) and one step, to keep it cheap."""
    width = height = 256
    pipe_image, pipe_latents, _ = _run_pipeline(
        tiny_pipe, steps=1, width=width, height=height, guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    with torch.no_grad():
        prompt_embeds, _ = tiny_pipe.encode_prompt(PROMPT, device="cpu")
    latents = sampling.sample(
        TorchTransformer(tiny_pipe.transformer), prompt_embeds, width=width, height=height, seed=seed, num_steps=1,
        scheduler_config=_ckpt_scheduler_config(tiny_ckpt), channels=tiny_pipe.transformer.config.in_channels,
    )
    rows, cols = latent_grid(width, height)
    assert np.array_equal(latents.numpy().reshape(rows * cols, -1), pipe_latents), f"seed {seed}"
    assert _pixel_diff(_decode(tiny_pipe, latents), pipe_image) <= MAX_PIXEL_DIFF


def test_end_to_end_with_reference(tiny_pipe, tiny_ckpt):
    from PIL import Image

    width, height, seed = 672, 1568, 3
    ref_w, ref_h = 320, 240  # already a multiple of 16 under 1 MP: the pipeline keeps it as it is
    rng = np.random.default_rng(5)
    gradient = np.linspace(0, 255, ref_w)[None, :, None] * np.array([1.0, 0.5, 0.2])
    pixels = np.clip(gradient + rng.integers(0, 60, (ref_h, ref_w, 3)), 0, 255).astype(np.uint8)
    reference_image = Image.fromarray(pixels)

    pipe_image, pipe_latents, pipe_calls = _run_pipeline(
        tiny_pipe, image=reference_image, width=width, height=height, guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    with torch.no_grad():
        prompt_embeds, _ = tiny_pipe.encode_prompt(PROMPT, device="cpu")
        processed = tiny_pipe.image_processor.preprocess(
            reference_image, height=ref_h, width=ref_w, resize_mode="crop"
        )
        ref_tokens, _ = tiny_pipe.prepare_image_latents(
            images=[processed], batch_size=1, generator=None, device="cpu", dtype=torch.float32
        )
    ref_grid = latent_grid(ref_w, ref_h)
    ref_tokens = ref_tokens[0].numpy()
    assert ref_tokens.shape == (ref_grid[0] * ref_grid[1], 32)

    dit = TorchTransformer(tiny_pipe.transformer)
    latents = sampling.sample(
        dit, prompt_embeds.numpy(), width=width, height=height, seed=seed, num_steps=4,
        scheduler_config=_ckpt_scheduler_config(tiny_ckpt), channels=32,
        references=[ref_tokens], reference_grids=[ref_grid],
    )
    rows, cols = latent_grid(width, height)
    assert dit.calls[0]["hidden_states"].shape == (1, rows * cols + ref_grid[0] * ref_grid[1], 32)
    _assert_same_inputs(dit.calls, pipe_calls, rows * cols)
    latents = latents.numpy()
    latent_diff = float(np.abs(latents.reshape(rows * cols, -1) - pipe_latents).max())
    pixel_diff = _pixel_diff(_decode(tiny_pipe, latents), pipe_image)
    print(f"\nreference {width}x{height}: max latent diff {latent_diff}, max pixel diff {pixel_diff}")
    assert latent_diff == 0.0, f"max latent diff {latent_diff}"
    assert pixel_diff <= MAX_PIXEL_DIFF, f"max pixel diff {pixel_diff} (latents differ by {latent_diff})"

    # The same reference given as a [h, w, C] grid (here a torch tensor) carries its own shape.
    as_grid = sampling.sample(
        TorchTransformer(tiny_pipe.transformer), prompt_embeds, width=width, height=height, seed=seed,
        num_steps=4, scheduler_config=_ckpt_scheduler_config(tiny_ckpt), channels=32,
        references=[torch.from_numpy(ref_tokens).reshape(*ref_grid, 32)],
    )
    assert np.array_equal(as_grid.numpy(), latents)
    # The reference matters: without it the picture is different.
    without = sampling.sample(
        TorchTransformer(tiny_pipe.transformer), prompt_embeds, width=width, height=height, seed=seed,
        num_steps=4, scheduler_config=_ckpt_scheduler_config(tiny_ckpt), channels=32,
    )
    assert not np.allclose(without.numpy(), latents)


@pytest.fixture(scope="module")
def tiny_base_pipe(tiny_base_ckpt):
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_base_ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_end_to_end_base_cfg(tiny_base_pipe, tiny_base_ckpt):
    width, height, seed, scale = 1024, 1024, 11, 4.0
    pipe = tiny_base_pipe
    is_distilled = model_index(tiny_base_ckpt)["is_distilled"]
    assert is_distilled is False and sampling.use_cfg(is_distilled, scale)

    pipe_image, pipe_latents, pipe_calls = _run_pipeline(
        pipe, width=width, height=height, guidance_scale=scale,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    with torch.no_grad():
        prompt_embeds, _ = pipe.encode_prompt(PROMPT, device="cpu")
        negative_embeds, _ = pipe.encode_prompt("", device="cpu")
    dit = TorchTransformer(pipe.transformer)
    sampler = oracles.Sampler(
        transformer=dit, scheduler_config=_ckpt_scheduler_config(tiny_base_ckpt), is_distilled=is_distilled,
        channels=pipe.transformer.config.in_channels,
    )
    latents = sampler(
        prompt_embeds.numpy(), negative_prompt_embeds=negative_embeds.numpy(), width=width, height=height,
        seed=seed, num_steps=4, guidance_scale=scale,
    )
    rows, cols = latent_grid(width, height)
    assert [c["batch"] for c in dit.calls] == [2] * 4  # one batched call per step, not two
    _assert_same_inputs(dit.calls, pipe_calls, rows * cols, cfg=True)
    assert isinstance(latents, torch.Tensor) and latents.dtype == torch.float32
    latents = latents.numpy().reshape(rows * cols, -1)
    latent_diff = float(np.abs(latents - pipe_latents).max())
    relative = latent_diff / float(np.abs(pipe_latents).max())
    pixel_diff = _pixel_diff(_decode(pipe, latents.reshape(rows, cols, -1)), pipe_image)
    print(
        f"\nbase CFG {scale} {width}x{height}: max latent diff {latent_diff} ({relative:.2e} of max |latent|), "
        f"max pixel diff {pixel_diff}"
    )
    # Batch 2 against the pipeline's two batch-1 calls: the DiT's matmuls round differently per batch size.
    assert relative < 1e-3, f"max latent diff {latent_diff} ({relative:.2e} relative)"
    assert pixel_diff <= MAX_PIXEL_DIFF, f"max pixel diff {pixel_diff} (latents differ by {latent_diff})"

    # With the DiT run one batch row at a time (as the pipeline runs it), the guidance and Euler math is
    # bit-identical: the whole difference above is batched-matmul rounding, not the sampler.
    def per_row(hidden, embeds, timestep, img_ids, txt_ids):
        rows_out = [dit(hidden[k : k + 1], embeds[k : k + 1], timestep[k : k + 1], img_ids, txt_ids) for k in range(2)]
        return torch.cat(rows_out)

    split = oracles.Sampler(
        transformer=per_row, scheduler_config=sampler.scheduler_config, is_distilled=False, channels=sampler.channels
    )
    split_latents = split(
        prompt_embeds.numpy(), negative_prompt_embeds=negative_embeds.numpy(), width=width, height=height,
        seed=seed, num_steps=4, guidance_scale=scale,
    )
    split_diff = float(np.abs(split_latents.numpy().reshape(rows * cols, -1) - pipe_latents).max())
    print(f"base CFG, DiT called per batch row: max latent diff {split_diff}")
    assert split_diff == 0.0, f"max latent diff {split_diff} with the DiT called per batch row"

    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        sampler(prompt_embeds.numpy(), width=width, height=height, seed=seed, num_steps=1, guidance_scale=scale)


# ------------------------------------------------------------------------------------ torch in, torch out

SMALL = dict(width=256, height=256, num_steps=2)  # a 16x16 token grid: the loop's plumbing, quickly
SMALL_REF_GRID = (6, 8)


def _small_inputs(transformer_module, seed=0):
    """Random float32 CPU tensors shaped like a request: prompt and negative embeds, one [h, w, C] reference."""
    generator = torch.Generator("cpu").manual_seed(seed)
    dim, channels = transformer_module.config.joint_attention_dim, transformer_module.config.in_channels
    prompt = torch.randn((1, 512, dim), generator=generator)
    negative = torch.randn((1, 512, dim), generator=generator)
    reference = torch.randn((*SMALL_REF_GRID, channels), generator=generator)
    return prompt, negative, reference


@pytest.mark.parametrize("cfg", [False, True], ids=["distilled", "cfg"])
def test_sample_torch_tensors_in_and_out(tiny_pipe, tiny_ckpt, cfg):
    module = tiny_pipe.transformer
    channels = module.config.in_channels
    prompt, negative, reference = _small_inputs(module)
    dit = TorchTransformer(module)
    seen = []
    latents = sampling.sample(
        dit, prompt, seed=5, scheduler_config=_ckpt_scheduler_config(tiny_ckpt), channels=channels,
        references=[reference], guidance_scale=3.5, do_cfg=cfg, negative_prompt_embeds=negative if cfg else None,
        step_callback=lambda i, x: seen.append((i, x)), **SMALL,  # no device: prompt's, the CPU
    )
    rows, cols = latent_grid(SMALL["width"], SMALL["height"])
    n_noise = rows * cols
    assert isinstance(latents, torch.Tensor)
    assert latents.dtype == torch.float32 and latents.device.type == "cpu" and latents.is_contiguous()
    assert latents.shape == (rows, cols, channels)

    # The callback gets a fresh [h*w, C] tensor per step; the last is the result.
    assert [i for i, _ in seen] == list(range(SMALL["num_steps"]))
    assert all(isinstance(x, torch.Tensor) and x.shape == (n_noise, channels) for _, x in seen)
    assert len({id(x) for _, x in seen}) == len(seen) and seen[0][1].data_ptr() != seen[1][1].data_ptr()
    assert torch.equal(seen[-1][1].reshape(rows, cols, channels), latents)

    # One reused hidden_states buffer: the noise rows hold each step's latents (every batch row the same),
    # the reference rows the reference, untouched from step to step.
    batch = 2 if cfg else 1
    assert [c["batch"] for c in dit.calls] == [batch] * SMALL["num_steps"] and len(dit.hidden_buffers) == 1
    starts = [oracles.initial_noise(SMALL["width"], SMALL["height"], channels, 5)] + [x.numpy() for _, x in seen]
    for call, start in zip(dit.calls, starts):
        hidden = call["hidden_states"]
        assert hidden.shape == (batch, n_noise + SMALL_REF_GRID[0] * SMALL_REF_GRID[1], channels)
        for k in range(batch):
            assert np.array_equal(hidden[k, :n_noise], start)
            assert np.array_equal(hidden[k, n_noise:], reference.reshape(-1, channels).numpy())

    # The transformer's output shape is checked.
    with pytest.raises(ValueError, match="transformer returned"):
        sampling.sample(
            lambda h, *_: torch.zeros(h.shape[0], 1, channels), prompt, seed=5, channels=channels,
            scheduler_config=_ckpt_scheduler_config(tiny_ckpt), **SMALL,
        )


@pytest.mark.parametrize("cfg", [False, True], ids=["distilled", "cfg"])
def test_numpy_and_torch_inputs_give_identical_latents(tiny_pipe, tiny_ckpt, cfg):
    module = tiny_pipe.transformer
    channels = module.config.in_channels
    prompt, negative, reference = _small_inputs(module, seed=1)
    common = dict(
        seed=9, scheduler_config=_ckpt_scheduler_config(tiny_ckpt), channels=channels, guidance_scale=2.5,
        do_cfg=cfg, **SMALL,
    )
    from_torch = sampling.sample(
        TorchTransformer(module), prompt, references=[reference],
        negative_prompt_embeds=negative if cfg else None, **common,
    )
    # numpy everywhere, the prompt [L, D] and read-only, the reference as tokens with its grid, the DiT
    # returning numpy, the device named
    prompt_np = prompt[0].numpy().copy()
    prompt_np.setflags(write=False)
    from_numpy = sampling.sample(
        TorchTransformer(module, numpy_out=True), prompt_np, device="cpu",
        references=[reference.reshape(-1, channels).numpy()], reference_grids=[SMALL_REF_GRID],
        negative_prompt_embeds=negative.numpy() if cfg else None, **common,
    )
    assert isinstance(from_numpy, torch.Tensor) and from_numpy.device.type == "cpu"
    assert torch.equal(from_torch, from_numpy)
    # and the inputs were not changed
    assert np.array_equal(prompt_np, prompt[0].numpy())
