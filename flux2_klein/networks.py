"""The four networks as torch modules with the exact signatures of their specs (specs.py), and how each is
loaded from a checkpoint (`load_wrapper`): what `export onnx` traces, the torch leaves serve
(torch_runtime.py) and `export fp8` calibrates. A model fact, not an export one: serving imports it without
the exporter.

Each wrapper computes what diffusers' Flux2KleinPipeline computes around the raw module, folded into
the graph where that saves a round trip or a copy: hidden-state stacking for the text encoder, the
latent batch-norm, 2x2 (un)patchify and image post-processing for the VAE. Compute runs in the
module's dtype; every boundary is float32 (or integer) as the specs say.

Weights are loaded one network at a time, so a 4B checkpoint never needs all of its parts in memory at once.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .checkpoint import Checkpoint
from .specs import NETWORKS, network_specs

# The DiT's layers (module-name patterns) that FP8 leaves in higher precision: the input embedders
# (x_embedder, context_embedder), the timestep embedding and the modulation MLPs (they set every block's
# scale and shift: small errors there move everything), norm_out and proj_out (the velocity itself).
# `export fp8` leaves their quantizers disabled; the torch leaves' FP8 GEMMs skip them (torch_runtime.py).
KEEP_HIGH_PRECISION = ("x_embedder*", "context_embedder*", "time_guidance_embed*", "*modulation*", "norm_out*",
                       "proj_out*")


def load_wrapper(ckpt: Checkpoint, network: str, dtype: torch.dtype) -> torch.nn.Module:
    """The network's torch module with its spec's signature, weights in `dtype`, eval mode."""
    path = ckpt.component
    if network == "text_encoder":
        from transformers import Qwen3ForCausalLM

        module = Qwen3ForCausalLM.from_pretrained(path("text_encoder"), dtype=dtype, attn_implementation="sdpa")
        spec_layers = network_specs(ckpt)["text_encoder"].config["out_layers"]
        return TextEncoderEmbeds(module, spec_layers).eval()
    if network == "transformer":
        from diffusers import Flux2Transformer2DModel

        return TransformerVelocity(Flux2Transformer2DModel.from_pretrained(path("transformer"), dtype=dtype)).eval()
    if network in ("vae_decoder", "vae_encoder"):
        from diffusers import AutoencoderKLFlux2

        vae = AutoencoderKLFlux2.from_pretrained(path("vae"), dtype=dtype)
        cls = VaeDecodeImage if network == "vae_decoder" else VaeEncodeTokens
        return cls(vae).eval()
    raise KeyError(f"network: {network!r}, expected one of {', '.join(NETWORKS)}")


class TextEncoderEmbeds(nn.Module):
    """Token ids and mask [B, 512] -> hidden states 9, 18, 27 stacked as [B, 512, 3 * hidden].

    Runs only the layers it reads (27 of Qwen3-4B's 36). transformers' `hidden_states[k]` is the output
    of layer k, except the last entry, which is the final RMSNorm's output: so a layer index equal to
    the model's depth gets the norm here too, and a deeper model's final norm is never computed.
    """

    def __init__(self, text_encoder, out_layers: tuple[int, ...]):
        super().__init__()
        self.model = text_encoder.model
        self.out_layers = tuple(out_layers)
        self.depth = len(self.model.layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        m = self.model
        hidden = m.embed_tokens(input_ids)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        # transformers' own mask builder, so padding and causality mean exactly what they mean there.
        # Its arguments were renamed across transformers 5.x (input_embeds -> inputs_embeds,
        # past_key_values -> cache, cache_position dropped): name them as this version does.
        params = inspect.signature(create_causal_mask).parameters
        kwargs = {"cache" if "cache" in params else "past_key_values": None}
        if "cache_position" in params:
            kwargs["cache_position"] = position_ids[0]
        kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
        mask = create_causal_mask(config=m.config, attention_mask=attention_mask, position_ids=position_ids,
                                  **kwargs)
        rope = m.rotary_emb(hidden, position_ids)
        picked = []
        for i, layer in enumerate(m.layers[: max(self.out_layers)]):
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rope)
            if i + 1 in self.out_layers:
                picked.append(m.norm(hidden) if i + 1 == self.depth else hidden)
        out = torch.stack(picked, dim=1)  # [B, k, T, H]
        b, k, t, h = out.shape
        return out.permute(0, 2, 1, 3).reshape(b, t, k * h).float()


class RopeF32(nn.Module):
    """Flux2PosEmbed in float32.

    diffusers computes the rotary angles in float64 on CPU; TensorRT has no float64 arithmetic. The
    frequencies are still derived in float64 and stored rounded to float32; positions are integers
    below 2**24, so the angles lose only float32 rounding (about 3e-5 rad at position 511).
    """

    def __init__(self, pos_embed):
        super().__init__()
        freqs, axis = [], []
        for i, dim in enumerate(pos_embed.axes_dim):
            freqs.append(1.0 / (pos_embed.theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)))
            axis += [i] * (dim // 2)
        self.register_buffer("freqs", torch.cat(freqs).float(), persistent=False)
        self.register_buffer("axis", torch.tensor(axis), persistent=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = ids.float()[:, self.axis] * self.freqs
        # Each frequency rotates a pair of channels (diffusers' repeat_interleave_real=True).
        return angles.cos().repeat_interleave(2, dim=-1), angles.sin().repeat_interleave(2, dim=-1)


class TransformerVelocity(nn.Module):
    """Packed tokens (noise, then references), prompt embeddings, timestep and ids -> velocity."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer
        self.transformer.pos_embed = RopeF32(transformer.pos_embed)

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids) -> torch.Tensor:
        dtype = self.transformer.dtype
        out = self.transformer(
            hidden_states=hidden_states.to(dtype),
            encoder_hidden_states=encoder_hidden_states.to(dtype),
            timestep=timestep.to(dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None,
            return_dict=False,
        )[0]
        return out.float()


class _LatentNorm(nn.Module):
    """The VAE's latent batch-norm statistics, as the pipeline applies them around the DiT."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.register_buffer("bn_mean", vae.bn.running_mean.detach().clone().float(), persistent=False)
        std = torch.sqrt(vae.bn.running_var.detach().float() + vae.config.batch_norm_eps)
        self.register_buffer("bn_std", std, persistent=False)


class VaeDecodeImage(_LatentNorm):
    """Latents [rows, cols, 4C] as the sampler leaves them -> RGB image uint8 [16 rows, 16 cols, 3].

    Folds the pipeline's unpack, batch-norm de-normalisation, 2x2 unpatchify, the decoder, and the
    image processor's post-processing ((x / 2 + 0.5) clamped, * 255, round half to even), so the
    network's output is the API's `image` with no host-side work left.
    """

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        rows, cols, c4 = latents.shape
        x = latents * self.bn_std + self.bn_mean
        x = x.reshape(rows, cols, c4 // 4, 2, 2).permute(2, 0, 3, 1, 4).reshape(1, c4 // 4, rows * 2, cols * 2)
        image = self.vae.decode(x.to(self.vae.dtype), return_dict=False)[0].float()
        image = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
        return (image * 255).round().to(torch.uint8)


class VaeEncodeTokens(_LatentNorm):
    """A preprocessed reference image uint8 [H, W, 3] -> its packed, normalised tokens [H*W/256, 4C].

    As the pipeline's `_encode_vae_image` and `prepare_image_latents`: the latent distribution's mode,
    2x2 patchify, batch-norm normalisation, packing. The [-1, 1] scaling of the image processor is
    folded in, so the client side sends 1 byte per channel instead of 4.
    """

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32) / 255.0
        x = (2.0 * x - 1.0).permute(2, 0, 1).unsqueeze(0)
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode().float()  # [1, C, H/8, W/8]
        _, c, h, w = z.shape
        z = z.reshape(c, h // 2, 2, w // 2, 2).permute(1, 3, 0, 2, 4).reshape((h // 2) * (w // 2), c * 4)
        return (z - self.bn_mean) / self.bn_std
