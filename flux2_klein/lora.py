"""LoRAs fused into a checkpoint before it is exported: `flux2-klein build --lora FILE[:SCALE]` (repeatable).

A LoRA file is what diffusers' `Flux2KleinPipeline.load_lora_weights` accepts (its `Flux2LoraLoaderMixin`:
diffusers, PEFT, ai-toolkit and Kohya key layouts, and LoKr), and fusing is diffusers' own: each file goes
through `Flux2LoraLoaderMixin.lora_state_dict` and `load_lora_into_transformer`, then all are fused at once
with their scales as adapter weights -- what `pipe.load_lora_weights(FILE, adapter_name=...)` for each, then
`pipe.set_adapters(names, weights)` and `pipe.fuse_lora(adapter_names=names)` do to the pipeline's
transformer (for one LoRA the same as `pipe.fuse_lora(lora_scale=SCALE)`).

The result is a new checkpoint folder: the fused transformer written in the checkpoint's own dtype, every
other component linked to the original, and `lora.json` naming the LoRAs and their `fingerprint` (what the
container's profile key includes).

diffusers' Flux2 loader loads LoRAs into the transformer only; a file with text-encoder keys is refused by
name rather than half applied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

LORA_MANIFEST = "lora.json"  # in the fused checkpoint: the LoRAs, their scales and fingerprint
TRANSFORMER = "transformer"


class LoraError(ValueError):
    """A LoRA argument or file that can't be fused; the message names it and what is allowed."""


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora FILE[:SCALE]`: a .safetensors file and the scale it is fused with (default 1.0)."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """'style.safetensors', 'style.safetensors:0.8' -> LoraSpec; LoraError for a missing file or a bad scale.
        A path may itself hold ':' -- only a last part that reads as a number is taken as the scale."""
        path, scale = text, 1.0
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                scale = float(tail)
                path = head
            except ValueError:
                pass
        if not (scale == scale and abs(scale) != float("inf")):  # NaN, inf
            raise LoraError(f"--lora {text!r}: the scale must be a finite number, got {tail!r}")
        spec = cls(Path(path), scale)
        if not spec.path.is_file():
            raise LoraError(f"--lora {text!r}: no such file {str(spec.path)!r} (expected FILE[:SCALE], FILE a "
                            ".safetensors LoRA as diffusers' load_lora_weights accepts)")
        if spec.path.suffix.lower() != ".safetensors":
            raise LoraError(f"--lora {text!r}: expected a .safetensors file (pickled weights are not loaded)")
        return spec


def fingerprint(loras: list[LoraSpec]) -> str:
    """A short hash of the LoRA files' bytes and scales, in order ("" for none): fusing A then B differs
    from B then A only in rounding, but a profile key must not guess that."""
    if not loras:
        return ""
    digest = hashlib.sha256()
    for lora in loras:
        file_hash = hashlib.sha256()
        with open(lora.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                file_hash.update(block)
        digest.update(file_hash.digest() + repr(float(lora.scale)).encode() + b"\0")
    return digest.hexdigest()[:16]


def _stored_dtype(transformer_dir: Path):
    """The dtype the checkpoint's transformer weights are stored in (the fused copy keeps it)."""
    from safetensors import safe_open

    files = sorted(transformer_dir.glob("*.safetensors"))
    if not files:
        raise LoraError(f"{transformer_dir}: no .safetensors weights to fuse into")
    with safe_open(str(files[0]), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
    except OSError:  # a filesystem without symlinks
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def fuse_loras(checkpoint: str | os.PathLike, loras: list[LoraSpec], out: str | os.PathLike) -> Path:
    """Write `out`: `checkpoint` with `loras` fused into its transformer, in order, each at its scale."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders import Flux2LoraLoaderMixin

    checkpoint, out = Path(checkpoint), Path(out)
    if not loras:
        raise LoraError("no LoRA to fuse")
    if out.exists():
        raise LoraError(f"{out} exists; the fused checkpoint is written to a new folder")
    source = checkpoint / TRANSFORMER
    transformer = Flux2Transformer2DModel.from_pretrained(source, torch_dtype=_stored_dtype(source))
    names = []
    for i, lora in enumerate(loras):
        state, metadata = Flux2LoraLoaderMixin.lora_state_dict(str(lora.path), return_lora_metadata=True)
        foreign = sorted({k.split(".")[0] for k in state if not k.startswith(f"{TRANSFORMER}.")})
        if foreign:
            raise LoraError(f"--lora {lora.path}: has weights for {', '.join(foreign)}; diffusers' Flux2 LoRA "
                            f"loader (and so this build) applies LoRAs to the transformer only")
        if not all("lora" in k or "lokr" in k for k in state):
            raise LoraError(f"--lora {lora.path}: not a LoRA or LoKr file (diffusers' load_lora_weights refuses it)")
        name = f"lora_{i}"
        Flux2LoraLoaderMixin.load_lora_into_transformer(state, transformer=transformer, adapter_name=name,
                                                        metadata=metadata)
        if not any(name in getattr(m, "lora_A", {}) or name in getattr(m, "lokr_w1", {})
                   for m in transformer.modules()):
            raise LoraError(f"--lora {lora.path}: none of its weights match a layer of this checkpoint's "
                            "transformer (a LoRA for another model?)")
        names.append(name)
    # All loaded first, then fused together with per-LoRA weights, as diffusers documents for several LoRAs:
    # loading an adapter into a model with a fused one unmerges that one, which would lose it.
    transformer.set_adapters(names, weights=[lora.scale for lora in loras])
    transformer.fuse_lora(lora_scale=1.0, adapter_names=names)
    transformer.unload_lora()  # drops the adapters; the fused weights stay

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    transformer.save_pretrained(tmp / TRANSFORMER, safe_serialization=True)
    for entry in checkpoint.iterdir():
        if entry.name not in (TRANSFORMER, LORA_MANIFEST):
            _link_or_copy(entry, tmp / entry.name)
    (tmp / LORA_MANIFEST).write_text(json.dumps({
        "base_checkpoint": str(checkpoint.resolve()), "fingerprint": fingerprint(loras),
        "loras": [{"file": str(lora.path.resolve()), "scale": lora.scale} for lora in loras]}, indent=2) + "\n")
    tmp.rename(out)
    return out


def manifest(checkpoint: str | os.PathLike) -> dict | None:
    """A fused checkpoint's lora.json (None for a checkpoint without LoRAs)."""
    path = Path(checkpoint) / LORA_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
