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
import math
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


def _text_encoder_config(config: dict, tokenizer):
    from transformers import Qwen3Config

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.setdefault("vocab_size", len(tokenizer))
    return Qwen3Config(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **config
    )


def _build_text_encoder(config: dict, tokenizer, tune: bool):
    import torch
    from transformers import Qwen3ForCausalLM

    text_encoder = Qwen3ForCausalLM(_text_encoder_config(config, tokenizer)).eval()
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
        # Non-trivial latent statistics, so a missing (de)normalisation shows in every test. A quarter of
        # the channels get variances of the order of batch_norm_eps, so that a dropped or doubled eps
        # moves a tenth of all pixel values (with variances near 1 it moved 0.2% of them by 1).
        channels = vae.bn.running_mean.shape[0]
        vae.bn.running_mean.copy_(torch.randn(channels) * 0.5)
        var = torch.rand(channels) * 1.5 + 0.5
        near_eps = channels // 4
        var[-near_eps:] = torch.rand(near_eps) * 2 * vae.config.batch_norm_eps
        vae.bn.running_var.copy_(var)
    if tune:
        _scale_(vae.decoder, 1.5)
    return vae


def write_random_checkpoint(out: Path, configs: dict, *, seed: int = 0, distilled: bool = True,
                            dtype: str = "float32", tune: bool = False) -> Path:
    """A random-weight checkpoint in diffusers layout, the networks built (and initialised) by their own
    classes and saved one at a time. Right for small configs; `tune` applies the tiny model's weight scaling
    (see the module docstring). Full-size configs go through `write_fast_random_checkpoint`.
    """
    import torch

    torch.manual_seed(seed)
    tokenizer = _write_tokenizer_and_scheduler(out)
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
    _write_model_index(out, distilled, tokenizer)
    return Path(out)


def _write_tokenizer_and_scheduler(out: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(out / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
    return tokenizer


def _write_model_index(out: Path, distilled: bool, tokenizer) -> None:
    import diffusers

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
    (Path(out) / "model_index.json").write_text(json.dumps(index, indent=2))


def make_tiny(out: Path, seed: int = 0, distilled: bool = True) -> Path:
    """Write a tiny random checkpoint to `out` and return it."""
    write_random_checkpoint(out, TINY_CONFIGS, seed=seed, distilled=distilled, tune=True)
    log.info("wrote tiny %s checkpoint (seed %d) to %s", "distilled" if distilled else "base", seed, out)
    return Path(out)


def make_full_size(out: Path, config_file: Path, seed: int = 0, dtype: str = "bfloat16",
                   workers: int | None = None) -> Path:
    """A random-weight checkpoint of the geometry in `config_file` (e.g. flux2_klein/configs/flux2-klein-4b.json),
    written without building the networks (see `write_fast_random_checkpoint`)."""
    cfg = json.loads(Path(config_file).read_text())
    distilled = bool(cfg.get("pipeline", {}).get("is_distilled", True))
    return write_fast_random_checkpoint(out, cfg, seed=seed, distilled=distilled, dtype=dtype, workers=workers)


# ------------------------------------------------------------------------------ full size, without modules

# safetensors' names for the dtypes a random checkpoint holds.
_SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "int64": "I64"}


def _meta_components(configs: dict, tokenizer) -> dict:
    """Each network built on the meta device: its classes' parameter names and shapes, no memory, no init."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    with torch.device("meta"):
        return {
            "text_encoder": Qwen3ForCausalLM(_text_encoder_config(configs["text_encoder"], tokenizer)),
            "transformer": Flux2Transformer2DModel(**configs["transformer"]),
            "vae": AutoencoderKLFlux2(**configs["vae"]),
        }


def _random_value(name: str, meta, dtype, generator):
    """The value a fresh network would start from, drawn fast: norm gains and running variances 1, biases and
    running means 0, every matrix or kernel normal with std 1/sqrt(fan-in) so that activations stay O(1)."""
    import torch

    if not meta.is_floating_point():
        return torch.zeros(meta.shape, dtype=meta.dtype)  # BatchNorm's num_batches_tracked
    if meta.ndim >= 2:
        fan_in = meta.numel() // meta.shape[0]
        return torch.empty(meta.shape, dtype=dtype).normal_(0.0, fan_in**-0.5, generator=generator)
    if name.rsplit(".", 1)[-1] in ("weight", "running_var"):  # every 1-D weight here is a norm's gain
        return torch.ones(meta.shape, dtype=dtype)
    return torch.zeros(meta.shape, dtype=dtype)


def _write_safetensors(path: Path, entries: list, make, workers: int) -> None:
    """Write a safetensors file tensor by tensor: the header first (it needs only names, dtypes and shapes),
    then each tensor as `make(i)` returns it, made `workers` at a time in threads (torch releases the GIL
    while it draws) and written in order, so memory holds a few tensors, never the whole file."""
    import struct
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import torch

    def raw(tensor):
        return tensor.reshape(-1).view(torch.uint8).numpy()

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[str(dtype).removeprefix("torch.")], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f, ThreadPoolExecutor(workers) as pool:
        f.write(struct.pack("<Q", len(blob)) + blob)
        pending: deque = deque()
        for i in range(len(entries)):
            pending.append(pool.submit(make, i))
            while len(pending) > 2 * workers:
                f.write(raw(pending.popleft().result()))
        while pending:
            f.write(raw(pending.popleft().result()))


def write_fast_random_checkpoint(out: Path, configs: dict, *, seed: int = 0, distilled: bool = True,
                                 dtype: str = "bfloat16", workers: int | None = None) -> Path:
    """A random-weight checkpoint in diffusers layout, loadable by `Flux2KleinPipeline.from_pretrained`,
    written in seconds: the networks are built on the meta device only for their configs and parameter
    names and shapes, and the random tensors go straight into one safetensors file per network. Tensor
    i of network k is drawn from its own generator, seeded by (seed, k, i): the same file whatever `workers`.
    """
    import os

    import numpy as np
    import torch
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from transformers.utils import SAFE_WEIGHTS_NAME

    workers = workers or os.cpu_count() or 1
    target = getattr(torch, dtype)
    out = Path(out)
    tokenizer = _write_tokenizer_and_scheduler(out)
    for k, (name, module) in enumerate(_meta_components(configs, tokenizer).items()):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        state = module.state_dict()
        if name == "text_encoder":
            module.config.dtype = dtype
            module.config.save_pretrained(folder)
            weights = SAFE_WEIGHTS_NAME
            if module.config.tie_word_embeddings:  # loaded from the embedding, as transformers saves it
                for tied in getattr(module, "_tied_weights_keys", None) or ():
                    state.pop(tied, None)
        else:
            module.save_config(folder)
            weights = SAFETENSORS_WEIGHTS_NAME
        names = list(state)
        entries = [(n, tuple(state[n].shape), target if state[n].is_floating_point() else state[n].dtype)
                   for n in names]

        def make(i, names=names, state=state, k=k):
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k, i]).generate_state(1)[0]))
            return _random_value(names[i], state[names[i]], target, generator)

        _write_safetensors(folder / weights, entries, make, workers)
        log.info("wrote %s (%.1f M values)", name, sum(math.prod(e[1]) for e in entries) / 1e6)
    _write_model_index(out, distilled, tokenizer)
    return out


def model_index(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "model_index.json").read_text())
