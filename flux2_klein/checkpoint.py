"""Reading a FLUX.2 [klein] checkpoint in diffusers layout (CONTRACT.md section 1), with clear errors.

Only configs are read here; weights are loaded by networks.py (`load_wrapper`), one network at a time, so a
4B checkpoint never needs all of its parts in memory at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .contract import Defaults

# component folder -> (library, class) as diffusers writes them into model_index.json
EXPECTED = {
    "transformer": ("diffusers", "Flux2Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKLFlux2"),
    "text_encoder": ("transformers", "Qwen3ForCausalLM"),
    "tokenizer": ("transformers", ("Qwen2TokenizerFast", "Qwen2Tokenizer")),
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
}
PIPELINE_CLASS = "Flux2KleinPipeline"
# Hidden states the pipeline stacks into the prompt embedding (Flux2KleinPipeline's default).
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)


class CheckpointError(ValueError):
    """The checkpoint directory is not a usable FLUX.2 [klein] checkpoint; the message says why."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model_index: dict
    transformer: dict
    vae: dict
    text_encoder: dict
    scheduler: dict

    @property
    def is_distilled(self) -> bool:
        return bool(self.model_index.get("is_distilled", False))

    @property
    def default_steps(self) -> int:
        return Defaults.for_checkpoint(self.is_distilled).num_inference_steps

    @property
    def default_guidance(self) -> float:
        return Defaults.for_checkpoint(self.is_distilled).guidance_scale

    @property
    def text_hidden(self) -> int:
        return int(self.text_encoder["hidden_size"])

    @property
    def text_layers(self) -> int:
        return int(self.text_encoder["num_hidden_layers"])

    @property
    def latent_channels(self) -> int:
        """Channels of one packed token: the VAE's latent channels times its 2x2 patch."""
        p = self.vae.get("patch_size", [2, 2])
        return int(self.vae["latent_channels"]) * int(p[0]) * int(p[1])

    def component(self, name: str) -> Path:
        return self.path / name


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what}: missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({e})") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Validate the layout and classes of a checkpoint directory and read its configs."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint: {path} is not a directory")
    index = _read_json(path / "model_index.json", "checkpoint")
    if index.get("_class_name") != PIPELINE_CLASS:
        raise CheckpointError(
            f"checkpoint: model_index.json names pipeline {index.get('_class_name')!r}, expected {PIPELINE_CLASS!r}"
        )
    problems = []
    for name, (library, classes) in EXPECTED.items():
        classes = (classes,) if isinstance(classes, str) else classes
        entry = index.get(name)
        if not entry or entry[1] is None:
            problems.append(f"{name}: missing from model_index.json")
        elif entry[1] not in classes:
            problems.append(f"{name}: class {entry[1]!r}, expected {' or '.join(classes)}")
        elif not (path / name).is_dir():
            problems.append(f"{name}: folder {path / name} is missing")
    if problems:
        raise CheckpointError("checkpoint: " + "; ".join(problems))
    ckpt = Checkpoint(
        path=path,
        model_index=index,
        transformer=_read_json(path / "transformer" / "config.json", "transformer"),
        vae=_read_json(path / "vae" / "config.json", "vae"),
        text_encoder=_read_json(path / "text_encoder" / "config.json", "text_encoder"),
        scheduler=_read_json(path / "scheduler" / "scheduler_config.json", "scheduler"),
    )
    if ckpt.text_layers < max(TEXT_ENCODER_OUT_LAYERS):
        raise CheckpointError(
            f"text_encoder: {ckpt.text_layers} layers, the pipeline reads hidden states "
            f"{TEXT_ENCODER_OUT_LAYERS} and needs at least {max(TEXT_ENCODER_OUT_LAYERS)}"
        )
    if int(ckpt.transformer["in_channels"]) != ckpt.latent_channels:
        raise CheckpointError(
            f"transformer: in_channels {ckpt.transformer['in_channels']} does not match the VAE's packed "
            f"latent channels {ckpt.latent_channels}"
        )
    return ckpt


def checkpoint_from_config(config_file: str | Path) -> Checkpoint:
    """The geometry of a checkpoint from one JSON of component configs (flux2_klein/configs/*.json), no
    weights: enough for specs, profiles and build plans (`flux2-klein build --dry-run --config`)."""
    path = Path(config_file)
    cfg = _read_json(path, "config")
    missing = [k for k in ("transformer", "vae", "text_encoder") if k not in cfg]
    if missing:
        raise CheckpointError(f"config: {path} lacks {', '.join(missing)}")
    distilled = bool(cfg.get("pipeline", {}).get("is_distilled", True))
    return Checkpoint(path=path, model_index={"_class_name": PIPELINE_CLASS, "is_distilled": distilled},
                      transformer=cfg["transformer"], vae=cfg["vae"], text_encoder=cfg["text_encoder"],
                      scheduler=cfg.get("scheduler", {}))
