"""A random-weight FLUX.2 [klein] checkpoint of the real classes, small enough for a CPU.

The geometry that matters to serving is kept real: a 4-level VAE (so 1024x1024 is 4096 image tokens),
32 latent channels' worth of packing (2x2 patches), a Qwen3 text encoder deep enough to have layers 9,
18 and 27, a byte-level BPE tokenizer with a Qwen3-style chat template. Everything else is shrunk.
Weights are scaled up from the default initialisation so that the prompt, the seed, the step count and
each reference image visibly change the picture: with the defaults a 1-layer DiT is nearly the identity
and equality tests would prove little.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# The scheduler config of the released klein checkpoints.
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

TEXT_HIDDEN = 16
TINY_CONFIGS = {
    "transformer": dict(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN, timestep_guidance_channels=32,
        mlp_ratio=2.0, axes_dims_rope=[4, 4, 4, 4], rope_theta=2000, eps=1e-6, guidance_embeds=False,
    ),
    "vae": dict(
        latent_channels=8, block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        mid_block_add_attention=True, patch_size=[2, 2], batch_norm_eps=1e-4,
    ),
    "text_encoder": dict(
        hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, rope_theta=1000000,
        tie_word_embeddings=True, rms_norm_eps=1e-6,
    ),
}

_CORPUS_WORDS = (
    "a an the of in on with and at by from under over near beside photo painting portrait close up "
    "cat dog fox owl horse robot astronaut castle forest river mountain city street beach ocean desert "
    "red orange yellow green blue purple black white golden silver bright dark soft warm cold misty "
    "sunset sunrise night morning rain snow fog storm light shadow reflection glass metal wood stone "
    "make turn change replace add remove the background into style of watercolor oil sketch neon "
    "cinematic detailed sharp blurry wide angle macro lens studio lighting hello world sign holding"
).split()


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # A deterministic corpus: every word alone and in short phrases, so common words become tokens.
    lines = [" ".join(_CORPUS_WORDS[i : i + 7]) for i in range(len(_CORPUS_WORDS))] * 4
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def make_tokenizer():
    from transformers import Qwen2TokenizerFast

    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size=600),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="right",
        model_max_length=131072,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _scale_(module, factor: float, names: tuple[str, ...] = ("weight",)) -> None:
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.rsplit(".", 1)[-1] in names and param.ndim >= 2:
                param.mul_(factor)


def _build_text_encoder(config: dict, tokenizer, tune: bool):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.setdefault("vocab_size", len(tokenizer))
    te_config = Qwen3Config(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **config
    )
    text_encoder = Qwen3ForCausalLM(te_config).eval()
    if tune:
        # Default init (std 0.02) leaves 28 layers of residual stream dominated by the embedding;
        # larger weights make the chosen hidden layers differ from each other and between prompts.
        with torch.no_grad():
            text_encoder.model.embed_tokens.weight.normal_(0.0, 1.0)
        _scale_(text_encoder.model.layers, 8.0)
    return text_encoder


def _build_transformer(config: dict, tune: bool):
    import torch
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(**config).eval()
    if tune:
        _scale_(transformer, 3.0)
        # Sharper attention (larger q/k RMSNorm gains) lets a few prompt tokens among 512, and the
        # content of a reference image, move the result by grey levels rather than fractions of one.
        with torch.no_grad():
            for name, param in transformer.named_parameters():
                if any(f"{n}.weight" in name for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
                    param.mul_(4.0)
    return transformer


def _build_vae(config: dict, tune: bool):
    import torch
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**config).eval()
    with torch.no_grad():
        # Non-trivial latent statistics, so a missing (de)normalisation shows in every test.
        channels = vae.bn.running_mean.shape[0]
        vae.bn.running_mean.copy_(torch.randn(channels) * 0.5)
        vae.bn.running_var.copy_(torch.rand(channels) * 1.5 + 0.5)
    if tune:
        _scale_(vae.decoder, 1.5)
    return vae


def write_random_checkpoint(out: Path, configs: dict, *, seed: int = 0, distilled: bool = True,
                            dtype: str = "float32", tune: bool = False) -> Path:
    """A random-weight checkpoint in diffusers layout for the given component configs.

    Components are built and saved one at a time, so a full-size (4B) checkpoint needs one network's
    memory, not three. `tune` applies the tiny model's weight scaling (see the module docstring).
    """
    import diffusers
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    builders = {
        "text_encoder": lambda: _build_text_encoder(configs["text_encoder"], tokenizer, tune),
        "transformer": lambda: _build_transformer(configs["transformer"], tune),
        "vae": lambda: _build_vae(configs["vae"], tune),
    }
    previous = torch.get_default_dtype()
    for name, build in builders.items():
        torch.set_default_dtype(getattr(torch, dtype))  # build in the target dtype: halves bf16 peak memory
        try:
            module = build()
        finally:
            torch.set_default_dtype(previous)
        module.save_pretrained(out / name, safe_serialization=True)
        log.info("wrote %s (%.1f M parameters)", name, sum(p.numel() for p in module.parameters()) / 1e6)
        del module
    index = {
        "_class_name": "Flux2KleinPipeline",
        "_diffusers_version": diffusers.__version__,
        "is_distilled": distilled,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def make_tiny(out: Path, seed: int = 0, distilled: bool = True) -> Path:
    """Write a tiny random checkpoint to `out` and return it."""
    write_random_checkpoint(out, TINY_CONFIGS, seed=seed, distilled=distilled, tune=True)
    log.info("wrote tiny %s checkpoint (seed %d) to %s", "distilled" if distilled else "base", seed, out)
    return Path(out)


def make_full_size(out: Path, config_file: Path, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """A random-weight checkpoint of the geometry in `config_file` (e.g. shared/configs/flux2-klein-4b.json)."""
    cfg = json.loads(Path(config_file).read_text())
    distilled = bool(cfg.get("pipeline", {}).get("is_distilled", True))
    return write_random_checkpoint(out, cfg, seed=seed, distilled=distilled, dtype=dtype)


def model_index(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "model_index.json").read_text())
