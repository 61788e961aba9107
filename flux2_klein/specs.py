"""One spec per network: tensor names, dtypes, dynamic axes and shape ranges, stated once.

The same `NetworkSpec` drives the ONNX export (names, dynamic axes, example inputs), the TensorRT
optimization profiles, and the Triton model configs. Ranges come from the checkpoint's configs and
the 17 sizes in `sizes.py`, never from numbers copied elsewhere.

Interfaces are float32 at every graph boundary whatever the compute precision inside: the sampler's
Euler steps stay in float32 as diffusers' scheduler does, numpy (the Triton Python backend's currency)
has no bfloat16, and the casts cost microseconds against milliseconds of compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .checkpoint import TEXT_ENCODER_OUT_LAYERS, Checkpoint
from .position_ids import latent_ids, reference_ids, text_ids
from .sizes import (
    MAX_REFERENCES, PIXELS_PER_TOKEN_SIDE, REFERENCE_MAX_AREA, REFERENCE_MAX_SIDE, REFERENCE_MIN_SIDE, SIZES,
    TEXT_TOKENS,
    image_tokens, latent_grid, reference_token_bounds,
)

# Batch of the DiT and text encoder: 2 covers a classifier-free-guidance pair (prompt, empty prompt).
MAX_BATCH = 2


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy dtype name: float32, int64, uint8
    shape: tuple[int | str, ...]  # ints are fixed; strings name a dynamic dimension

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class Profile:
    """An optimization profile: (min, opt, max) for every dynamic dimension of the network."""

    name: str
    dims: dict[str, tuple[int, int, int]]

    def covers(self, **dims: int) -> bool:
        return all(self.dims[k][0] <= v <= self.dims[k][2] for k, v in dims.items())


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    profiles: tuple[Profile, ...]
    # A dimension that is an exact multiple of another (the VAE encoder's pixel sides are 16 x tokens):
    # name -> (base dimension, factor). Export needs to know; profiles state the derived one directly.
    derived: dict[str, tuple[str, int]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # numbers the wrappers need (channels, layers)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> Tensor:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(name)

    def shape(self, tensor: Tensor, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in tensor.shape)

    def profile_shapes(self, profile: Profile) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Input name -> (min shape, opt shape, max shape) for a TensorRT optimization profile."""
        out = {}
        for t in self.inputs:
            out[t.name] = tuple(self.shape(t, {k: v[i] for k, v in profile.dims.items()}) for i in range(3))
        return out

    def profile_for(self, **dims: int) -> Profile | None:
        """The narrowest profile that covers the given dimensions, or None."""
        fits = [p for p in self.profiles if p.covers(**dims)]
        return min(fits, key=lambda p: sum(hi - lo for lo, _, hi in p.dims.values()), default=None)


def _range(values) -> tuple[int, int]:
    values = list(values)
    return min(values), max(values)


def text_encoder_spec(ckpt: Checkpoint) -> NetworkSpec:
    width = ckpt.text_hidden * len(TEXT_ENCODER_OUT_LAYERS)
    return NetworkSpec(
        name="text_encoder",
        inputs=(
            Tensor("input_ids", "int64", ("batch", TEXT_TOKENS)),
            Tensor("attention_mask", "int64", ("batch", TEXT_TOKENS)),
        ),
        outputs=(Tensor("prompt_embeds", "float32", ("batch", TEXT_TOKENS, width)),),
        profiles=(Profile("prompt", {"batch": (1, 1, MAX_BATCH)}),),
        config={"out_layers": TEXT_ENCODER_OUT_LAYERS, "width": width},
    )


def transformer_spec(ckpt: Checkpoint) -> NetworkSpec:
    channels = ckpt.latent_channels
    joint = int(ckpt.transformer["joint_attention_dim"])
    t2i_min, t2i_max = _range(image_tokens(w, h) for w, h in SIZES)
    t2i_opt = image_tokens(1024, 1024)
    ref_min, ref_max = reference_token_bounds()
    # Inpainting's picture rides as the first condition at the output size (request.py), so a condition
    # can hold up to t2i_max tokens (4150 at 800x1328, above a 1 MP reference's 4096), beside at most
    # MAX_REFERENCES - 1 references.
    one_cond = max(ref_max, t2i_max)
    all_cond = max(MAX_REFERENCES * ref_max, t2i_max + (MAX_REFERENCES - 1) * ref_max)
    # Three profiles rather than one wide one: kernels are chosen for the opt shape and a range of
    # 4042..20588 tokens would tune text-to-image (the common case) for a 5x longer sequence.
    profiles = (
        Profile("t2i", {"batch": (1, 1, MAX_BATCH), "tokens": (t2i_min, t2i_opt, t2i_max)}),
        Profile("edit", {"batch": (1, 1, MAX_BATCH), "tokens": (t2i_min + ref_min, 2 * t2i_opt, t2i_max + one_cond)}),
        Profile(
            "multi_ref",
            {"batch": (1, 1, MAX_BATCH),
             "tokens": (t2i_min + 2 * ref_min, 3 * t2i_opt, t2i_max + all_cond)},
        ),
    )
    return NetworkSpec(
        name="transformer",
        inputs=(
            Tensor("hidden_states", "float32", ("batch", "tokens", channels)),
            Tensor("encoder_hidden_states", "float32", ("batch", TEXT_TOKENS, joint)),
            Tensor("timestep", "float32", ("batch",)),
            Tensor("img_ids", "int64", ("tokens", 4)),
            Tensor("txt_ids", "int64", (TEXT_TOKENS, 4)),
        ),
        outputs=(Tensor("velocity", "float32", ("batch", "tokens", channels)),),
        profiles=profiles,
        config={"channels": channels, "joint_attention_dim": joint},
    )


def vae_decoder_spec(ckpt: Checkpoint) -> NetworkSpec:
    """One profile: the box of the 17 sizes' latent grids (42..98 rows by 42..98 columns). Its largest shape,
    98x98, is no size of ours, but aspect buckets would hold more, not less: Triton's tensorrt_backend makes
    one execution context per listed profile when an instance loads, each with its own activation memory
    (src/instance_state.cc, InitializeExecutionContexts: "Create one TRT context for each specified
    profile", createExecutionContext(AllocationStrategy()), read at e2ef6d7), so the memory held is the
    sum over profiles: wide/square/tall boxes of 59x98 + 64x64 + 98x59 latent cells (15,660) against one
    98x98 (9,604)."""
    channels = ckpt.latent_channels
    rows = _range(latent_grid(w, h)[0] for w, h in SIZES)
    cols = _range(latent_grid(w, h)[1] for w, h in SIZES)
    opt_rows, opt_cols = latent_grid(1024, 1024)
    return NetworkSpec(
        name="vae_decoder",
        inputs=(Tensor("latents", "float32", ("rows", "cols", channels)),),
        outputs=(Tensor("image", "uint8", ("height", "width", 3)),),
        profiles=(Profile("image", {"rows": (rows[0], opt_rows, rows[1]), "cols": (cols[0], opt_cols, cols[1])}),),
        config={"channels": channels},
    )


# TensorRT sizes activation memory for a profile's largest shape, and one box of 64..2896 pixels a side
# would admit 2896 x 2896 (8.4 MP, the VAE's mid-block attention alone tens of GB) where preprocessing
# caps references at 1 MP. So references get aspect buckets: boxes of at most this many pixels that
# together hold every shape preprocessing can produce (sides multiples of 16 in 64..2896, area <= 1 MP).
REFERENCE_PROFILE_MAX_AREA = 3 * REFERENCE_MAX_AREA // 2


def _floor16(x: float) -> int:
    return int(x) // PIXELS_PER_TOKEN_SIDE * PIXELS_PER_TOKEN_SIDE


def reference_profiles() -> tuple[Profile, ...]:
    """A square bucket up to 1024 a side, then tall buckets (and the same transposed, wide) over the
    longer side, each as wide as the 1 MP area allows at its shortest height."""
    side = _floor16(REFERENCE_MAX_AREA ** 0.5)
    lo_side, step = REFERENCE_MIN_SIDE, PIXELS_PER_TOKEN_SIDE
    tall, lo = [], side + step
    while lo <= REFERENCE_MAX_SIDE:
        # Also every one of the 17 sizes (an inpainting picture is encoded at the output size, and
        # 672x1568 is a little over 1 MP): its short side where its long side falls in this bucket.
        short = max([min(REFERENCE_MAX_SIDE, _floor16(REFERENCE_MAX_AREA / lo))]
                    + [min(w, h) for w, h in SIZES if max(w, h) >= lo])
        hi = min(REFERENCE_MAX_SIDE, _floor16(REFERENCE_PROFILE_MAX_AREA / short))
        long_opt = _floor16((lo * hi) ** 0.5)
        tall.append(((lo, long_opt, hi), (lo_side, min(short, _floor16(REFERENCE_MAX_AREA / long_opt)), short)))
        lo = hi + step
    return (
        Profile("square", {"height": (lo_side, side, side), "width": (lo_side, side, side)}),
        *(Profile(f"tall{i}", {"height": h, "width": w}) for i, (h, w) in enumerate(tall, 1)),
        *(Profile(f"wide{i}", {"height": w, "width": h}) for i, (h, w) in enumerate(tall, 1)),
    )


def vae_encoder_spec(ckpt: Checkpoint) -> NetworkSpec:
    channels = ckpt.latent_channels
    return NetworkSpec(
        name="vae_encoder",
        inputs=(Tensor("image", "uint8", ("height", "width", 3)),),
        outputs=(Tensor("tokens", "float32", ("ref_tokens", channels)),),
        profiles=reference_profiles(),
        derived={"height": ("token_rows", PIXELS_PER_TOKEN_SIDE), "width": ("token_cols", PIXELS_PER_TOKEN_SIDE)},
        config={"channels": channels},
    )


SPEC_BUILDERS = {
    "text_encoder": text_encoder_spec,
    "transformer": transformer_spec,
    "vae_decoder": vae_decoder_spec,
    "vae_encoder": vae_encoder_spec,
}
NETWORKS = tuple(SPEC_BUILDERS)


def network_specs(ckpt: Checkpoint) -> dict[str, NetworkSpec]:
    return {name: build(ckpt) for name, build in SPEC_BUILDERS.items()}


# -- example inputs: valid values for export tracing and for parity tests -------------------------

def example_inputs(spec: NetworkSpec, rng: np.random.Generator, *, batch: int = 2,
                   size: tuple[int, int] = (1024, 1024), references: tuple[tuple[int, int], ...] = ()
                   ) -> dict[str, np.ndarray]:
    """Inputs of the right shapes and plausible values: `size` is (width, height) of the output and
    `references` the (width, height) of each preprocessed reference image. Batch 2 by default: the
    exporter specialises a dimension traced at size 1."""
    rows, cols = latent_grid(*size)
    if spec.name == "text_encoder":
        ids = rng.integers(0, 100, (batch, TEXT_TOKENS), dtype=np.int64)
        mask = np.zeros((batch, TEXT_TOKENS), dtype=np.int64)
        for b in range(batch):
            mask[b, : 20 + 7 * b] = 1
        return {"input_ids": ids, "attention_mask": mask}
    if spec.name == "transformer":
        img_ids = np.concatenate([latent_ids(*size), reference_ids([latent_grid(w, h) for w, h in references])])
        c = spec.config["channels"]
        return {
            "hidden_states": rng.standard_normal((batch, len(img_ids), c), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, TEXT_TOKENS, spec.config["joint_attention_dim"]),
                                                         dtype=np.float32),
            "timestep": np.full((batch,), 0.75, dtype=np.float32),
            "img_ids": img_ids,
            "txt_ids": text_ids(),
        }
    if spec.name == "vae_decoder":
        return {"latents": rng.standard_normal((rows, cols, spec.config["channels"]), dtype=np.float32)}
    if spec.name == "vae_encoder":
        w, h = references[0] if references else size
        return {"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)}
    raise KeyError(spec.name)
