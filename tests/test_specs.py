"""The specs' shape ranges cover everything the API accepts: all 17 sizes, 0-4 references."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from flux2_klein.configs import config_path
from flux2_klein.checkpoint import Checkpoint, CheckpointError, checkpoint_from_config, load_checkpoint
from flux2_klein.sizes import (
    MAX_REFERENCES, REFERENCE_MAX_SIDE, REFERENCE_MIN_SIDE, SIZES, image_tokens, latent_grid,
    reference_token_bounds,
)
from flux2_klein.specs import network_specs

FULL_CONFIG = config_path("4b")


def full_size_checkpoint() -> Checkpoint:
    """The real 4B geometry, from the shared config file."""
    if not FULL_CONFIG.exists():
        pytest.skip(f"{FULL_CONFIG} not found")
    return checkpoint_from_config(FULL_CONFIG)


@pytest.fixture(params=["tiny", "4b"])
def specs(request, tiny_ckpt):
    ckpt = load_checkpoint(tiny_ckpt) if request.param == "tiny" else full_size_checkpoint()
    return network_specs(ckpt)


def test_the_17_sizes():
    assert len(SIZES) == 17 and len(set(SIZES)) == 17
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in SIZES)
    tokens = [image_tokens(w, h) for w, h in SIZES]
    assert (min(tokens), max(tokens)) == (4042, 4150)
    assert image_tokens(1024, 1024) == 4096


# Worked out by hand, not by the code under test: the smallest reference diffusers accepts is 64x64
# pixels = 4x4 tokens of 16x16; a larger one is resized to at most 1024x1024 pixels = 64x64 tokens.
REF_TOKENS_MIN, REF_TOKENS_MAX = 16, 4096


def test_reference_token_bounds_and_transformer_profiles_by_hand(specs):
    assert reference_token_bounds() == (REF_TOKENS_MIN, REF_TOKENS_MAX)
    # Text-to-image spans 1504x688 (94x43 = 4042 tokens) to 1328x800 (83x50 = 4150); an edit adds one
    # reference of 16..4096 tokens, multi_ref two to four. Inpainting's picture rides as a condition at the
    # output size (up to 4150 tokens) beside at most three references.
    tokens = {p.name: p.dims["tokens"] for p in specs["transformer"].profiles}
    assert tokens == {
        "t2i": (4042, 4096, 4150),
        "edit": (4042 + 16, 2 * 4096, 4150 + 4150),
        "multi_ref": (4042 + 2 * 16, 3 * 4096, 4150 + 4150 + 3 * 4096),
    }
    assert tokens["multi_ref"][2] == 20588  # the number README.md quotes


def test_every_request_falls_inside_a_transformer_profile(specs):
    spec = specs["transformer"]
    ref_lo, ref_hi = REF_TOKENS_MIN, REF_TOKENS_MAX
    for (w, h), n in itertools.product(SIZES, range(MAX_REFERENCES + 1)):
        for ref_tokens in {n * ref_lo, n * ref_hi, n * (ref_lo + ref_hi) // 2}:
            for batch in (1, 2):
                tokens = image_tokens(w, h) + ref_tokens
                assert spec.profile_for(batch=batch, tokens=tokens) is not None, (w, h, n, ref_tokens, batch)
    # The opt shapes are the common case: 1024x1024 text-to-image picks the narrow t2i profile.
    t2i = spec.profile_for(batch=1, tokens=4096)
    assert t2i.name == "t2i" and t2i.dims["tokens"][1] == 4096 and t2i.dims["batch"][1] == 1


def test_every_size_falls_inside_the_vae_decoder_profile(specs):
    (profile,) = specs["vae_decoder"].profiles
    for w, h in SIZES:
        rows, cols = latent_grid(w, h)
        assert profile.covers(rows=rows, cols=cols), (w, h)
    assert profile.dims["rows"][1] == profile.dims["cols"][1] == 64


def test_every_reference_falls_inside_a_vae_encoder_profile(specs):
    spec = specs["vae_encoder"]
    assert (REFERENCE_MIN_SIDE, REFERENCE_MAX_SIDE) == (64, 2896)  # 2896 = 8:1 at one megapixel, floored to 16
    # Every shape preprocessing can leave, by hand: sides multiples of 16 from 64 to 2896, at most 1024x1024
    # pixels in all; diffusers allows 8:1 before flooring each side to 16, which can take up to 15 pixels
    # off the short side, so the long side stays below 8 x (short + 16).
    sides = range(64, 2896 + 1, 16)
    shapes = [(w, h) for w in sides for h in sides if w * h <= 1024 * 1024 and max(w, h) < 8 * (min(w, h) + 16)]
    assert (64, 64) in shapes and (2896, 352) in shapes and (1024, 1024) in shapes and (1040, 1024) not in shapes
    missing = [(w, h) for w, h in shapes if spec.profile_for(height=h, width=w) is None]
    assert not missing, missing[:10]


def test_a_size_outside_the_profiles_is_detected(specs):
    spec = specs["transformer"]
    assert spec.profile_for(batch=1, tokens=4041) is None  # smaller than every supported size
    assert spec.profile_for(batch=3, tokens=4096) is None
    assert not specs["vae_decoder"].profiles[0].covers(rows=41, cols=64)


def test_real_geometry_widths():
    specs = network_specs(full_size_checkpoint())
    assert specs["text_encoder"].outputs[0].shape == ("batch", 512, 7680)
    assert specs["transformer"].inputs[0].shape == ("batch", "tokens", 128)
    assert specs["transformer"].inputs[1].shape == ("batch", 512, 7680)
    assert specs["vae_decoder"].inputs[0].shape == ("rows", "cols", 128)


def test_bad_checkpoints_name_what_is_wrong(tiny_ckpt, tmp_path):
    import shutil

    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nothing")
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    shutil.rmtree(bad / "vae")
    with pytest.raises(CheckpointError, match="vae: folder .* is missing"):
        load_checkpoint(bad)
    shutil.copytree(tiny_ckpt / "vae", bad / "vae")
    index = json.loads((bad / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="transformer: class 'FluxTransformer2DModel', expected Flux2Transformer2DModel"):
        load_checkpoint(bad)
    index["_class_name"] = "FluxPipeline"
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="expected 'Flux2KleinPipeline'"):
        load_checkpoint(bad)
