"""LoRAs chosen per request from a library (`flux2-klein build --runtime torch --lora-library DIR`).

A library is a folder of klein LoRA files, `<name>.safetensors` each; a request names the ones it wants with
their scales in its `loras` input ("style:0.8,detail": `detail` at 1.0). Three jobs live here, with no
transport and no Triton:

* `scan`: the folder checked file by file while the repository is built, before any other work (a file that
  is not a LoRA, a LoRA for another model or for the text encoder, a name two files share): `LoraError`
  naming the file. The check reads the files and the checkpoint's weight *headers* (names and shapes), not
  its weights, so it costs seconds for a 4B transformer. The result, `Library`, is written into the
  repository (the preprocess model lists the names it accepts, the DiT leaf the files and their hashes).
* `parse_choice` / `format_choice`: the `loras` wire form, one home for clients, preprocess, sampler and DiT.
* `Adapters`: the torch DiT leaf's side. Every file of the library is loaded at start as an unfused peft
  adapter (diffusers' `Flux2LoraLoaderMixin.lora_state_dict` + `load_lora_into_transformer`, as
  `pipe.load_lora_weights(file, adapter_name=...)` does), a file changed since the build fails the load, and
  each DiT call first activates its request's set: `set_adapters(names, weights)` as diffusers'
  `pipe.set_adapters(names, adapter_weights=...)` does, or every adapter disabled for a request without
  LoRAs (peft's LoRA layers then answer their base layer alone: the plain model's numbers). The sampler
  batches only requests with one set (sampling.Shape), so a DiT call has one set.

Why torch only: ONNX graphs and TensorRT engines carry their weights as constants; a LoRA there is fused at
build time (`--lora`, flux2_klein/lora.py). A refittable engine (BuilderFlag.REFIT) could take new weights
between batches, but every change of set would refit each LoRA-touched weight while that engine instance
serves nobody, so requests of different sets would take turns at the refit's price, and no number for that
price exists here: TensorRT-RTX on this CPU builds the plain DiT engine but not the refittable one (its JIT
needs CUDA; bench/trt_refit_probe.py, bench/results/2026-12-03-cpu-trt-refit-probe.json). Until a GPU
measures it, repository.BuildOptions refuses a library on those runtimes by name and keeps build-time fusing.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from .contract import MODEL_NAME
from .files import file_sha256
from .lora import TRANSFORMER, LoraError

SUFFIX = ".safetensors"
# A name travels in "name:scale,name" and in OpenAI's `model` field: no separators, no spaces.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A request's set: each LoRA costs two thin GEMMs per adapted layer per DiT call (bench/results: 3 LoRAs).
MAX_PER_REQUEST = 4
# Scales beyond this are no style any more, only noise; diffusers takes any, we name the range.
MAX_SCALE = 8.0
# The names the OpenAI `model` field already means: the served model itself.
RESERVED = {MODEL_NAME.lower(), MODEL_NAME.replace("_", "-").lower()}
# The preprocess model's config parameter that lists the served names (what the gateway reads, too).
NAMES_PARAMETER = "lora_names"
# `flux2-klein build --lora-library`'s default.
LIBRARY_ENV = "FLUX2_KLEIN_LORA_LIBRARY"
# The DiT leaf's config parameter: the library as scanned (Library.to_json).
LIBRARY_PARAMETER = "lora_library"


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class Library:
    """A checked library: its files by name, in name order."""

    folder: Path
    files: tuple[LoraFile, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files)

    def to_json(self) -> str:
        return json.dumps({"folder": str(self.folder), "loras": [
            {"name": f.name, "file": str(f.path), "sha256": f.sha256} for f in self.files]})

    @classmethod
    def from_json(cls, text: str) -> Library:
        data = json.loads(text)
        return cls(Path(data["folder"]), tuple(LoraFile(x["name"], Path(x["file"]), x["sha256"])
                                               for x in data["loras"]))


def served_names(parameters: dict[str, str]) -> tuple[str, ...]:
    """The LoRA names a repository serves, from its preprocess model's config parameters (empty: none)."""
    return tuple(json.loads(parameters.get(NAMES_PARAMETER) or "[]"))


# ------------------------------------------------------------------------------------- the wire form


def parse_choice(text: str, served: tuple[str, ...] | None = None) -> tuple[tuple[str, float], ...]:
    """'style:0.8,detail' -> (('style', 0.8), ('detail', 1.0)); ValueError saying what is wrong and what is
    allowed. With `served`, a name outside it is refused and the served names are listed. Order is kept (the
    adapters' deltas are summed in that order, as diffusers' set_adapters does)."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if len(items) > MAX_PER_REQUEST:
        raise ValueError(f"{len(items)} LoRAs; at most {MAX_PER_REQUEST} per request")
    choice, seen = [], set()
    for item in items:
        name, sep, scale_text = item.partition(":")
        name = name.strip()
        if not NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a LoRA name (letters, digits, '_', '.', '-'; as `name:scale,name`)")
        scale = 1.0
        if sep:
            try:
                scale = float(scale_text)
            except ValueError:
                raise ValueError(f"{name}: scale {scale_text.strip()!r} is not a number") from None
            if not (math.isfinite(scale) and abs(scale) <= MAX_SCALE):
                raise ValueError(f"{name}: scale {scale_text.strip()} is outside -{MAX_SCALE:g}..{MAX_SCALE:g}")
        if name in seen:
            raise ValueError(f"{name} is named twice")
        if served is not None and name not in served:
            listed = ", ".join(served) if served else "none"
            raise ValueError(f"{name!r} is not in this server's LoRA library; served: {listed}")
        seen.add(name)
        choice.append((name, scale))
    return tuple(choice)


def format_choice(choice) -> str:
    """The wire form of a set: a str as it is, or pairs / a mapping of name -> scale, or bare names."""
    if isinstance(choice, str):
        return choice
    items = choice.items() if isinstance(choice, dict) else choice
    parts = []
    for item in items:
        name, scale = (item, 1.0) if isinstance(item, str) else item
        parts.append(f"{name}:{float(scale)!r}")
    return ",".join(parts)


def choice_of_tensor(tensor, served: tuple[str, ...] | None = None) -> tuple[tuple[str, float], ...]:
    """parse_choice of a set as it travels between models: the one element of a BYTES tensor (numpy object
    array, any shape), bytes or str."""
    item = tensor.reshape(-1)[0]
    return parse_choice(item.decode("utf-8") if isinstance(item, bytes) else str(item), served)


# ------------------------------------------------------------------------------------- the library


def _base_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """The transformer's weight names and shapes, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted((checkpoint / TRANSFORMER).glob("*" + SUFFIX)):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _layer(key: str) -> tuple[str, str] | None:
    """'transformer.blocks.0.attn.to_q.lora_A.weight' -> ('blocks.0.attn.to_q', 'lora_A'); None otherwise."""
    for part in ("lora_A", "lora_B", "lokr_"):
        head, sep, _ = key.partition(f".{part}")
        if sep:
            return head.removeprefix(f"{TRANSFORMER}."), part
    return None


def check_file(path: Path, base: dict[str, tuple[int, ...]]) -> None:
    """LoraError naming `path` unless diffusers' Flux2 loader reads it as a LoRA whose every layer is one of
    this transformer's, with matching sides."""
    from diffusers.loaders import Flux2LoraLoaderMixin

    try:
        state = Flux2LoraLoaderMixin.lora_state_dict(str(path))
    except Exception as e:  # noqa: BLE001 - whatever the loader trips on, the file is what is wrong
        raise LoraError(f"{path}: not a LoRA file diffusers' Flux2 loader reads ({type(e).__name__}: {e})") from None
    if isinstance(state, tuple):
        state = state[0]
    if not state:
        raise LoraError(f"{path}: holds no weights")
    layers = {k: _layer(k) for k in state}
    if not all(layers.values()):
        odd = next(k for k, v in layers.items() if v is None)
        raise LoraError(f"{path}: not a LoRA or LoKr file (a weight {odd!r} is neither lora_A/lora_B nor lokr)")
    foreign = sorted({k.split(".")[0] for k in state if not k.startswith(f"{TRANSFORMER}.")})
    if foreign:
        raise LoraError(f"{path}: has weights for {', '.join(foreign)}; diffusers' Flux2 LoRA loader (and so this "
                        "server) applies LoRAs to the transformer only")
    missing = sorted({m for m, _ in layers.values() if f"{m}.weight" not in base})
    if missing:
        raise LoraError(f"{path}: {len(missing)} of its layers are not in this checkpoint's transformer (e.g. "
                        f"{missing[0]!r}): a LoRA for another model?")
    for key, (module, part) in layers.items():
        out_features, in_features = base[f"{module}.weight"][:2]
        shape = tuple(state[key].shape)
        if part == "lora_A" and shape[-1] != in_features or part == "lora_B" and shape[0] != out_features:
            raise LoraError(f"{path}: layer {module!r} is {out_features}x{in_features} in this checkpoint, its "
                            f"{part} is {'x'.join(map(str, shape))}: a LoRA for another model (another klein size?)")


def scan(folder: str | Path, checkpoint: str | Path) -> Library:
    """Check every file of `folder` against `checkpoint`'s transformer; the library, or LoraError naming the
    first file refused. Every entry must be a `<name>.safetensors` LoRA (hidden files aside): a stray file
    is refused rather than skipped, so that what is served is what the folder shows."""
    folder, checkpoint = Path(folder).resolve(), Path(checkpoint)
    if not folder.is_dir():
        raise LoraError(f"lora_library: {folder} is not a folder (expected one of <name>{SUFFIX} LoRA files)")
    base = _base_shapes(checkpoint)
    files, lowered = [], {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file() or path.suffix.lower() != SUFFIX:
            raise LoraError(f"{path}: only <name>{SUFFIX} LoRA files belong in the library (pickled weights are "
                            "not loaded; move other files elsewhere)")
        name = path.name[:-len(SUFFIX)]
        if not NAME.fullmatch(name):
            raise LoraError(f"{path}: {name!r} cannot name a LoRA (letters, digits, '_', '.', '-', at most 64, "
                            "starting with a letter or digit): rename the file")
        if name.lower() in RESERVED:
            raise LoraError(f"{path}: {name!r} is the served model's own name (OpenAI's `model` field): rename it")
        if name.lower() in lowered:
            raise LoraError(f"{path}: its name clashes with {lowered[name.lower()]} (names differ only in case); "
                            "rename one")
        lowered[name.lower()] = path
        check_file(path, base)
        files.append(LoraFile(name, path, file_sha256(path)))
    if not files:
        raise LoraError(f"lora_library: {folder} holds no <name>{SUFFIX} file")
    return Library(folder, tuple(files))


# ------------------------------------------------------------------------------------- the DiT's side


class Adapters:
    """A library's LoRAs loaded unfused into a diffusers Flux2 transformer, one set active at a time."""

    def __init__(self, transformer, library: Library):
        from diffusers.loaders import Flux2LoraLoaderMixin

        self.transformer = transformer
        self.ids = {}  # name -> peft adapter name (peft's names key module dicts: no '.')
        for i, entry in enumerate(library.files):
            if not entry.path.is_file():
                raise LoraError(f"{entry.path}: missing; the repository was built with it (rebuild, or put it back)")
            if file_sha256(entry.path) != entry.sha256:
                raise LoraError(f"{entry.path}: changed since the repository was built; rebuild it so that its "
                                "check and its name list cover what is served")
            state, metadata = Flux2LoraLoaderMixin.lora_state_dict(str(entry.path), return_lora_metadata=True)
            adapter = f"library_{i}"
            with warnings.catch_warnings():  # peft's "multiple adapters in the model": that is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                Flux2LoraLoaderMixin.load_lora_into_transformer(state, transformer=transformer, adapter_name=adapter,
                                                                metadata=metadata)
            self.ids[entry.name] = adapter
        self.active: tuple[tuple[str, float], ...] | None = None
        self.activate(())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.ids)

    def activate(self, choice: tuple[tuple[str, float], ...]) -> None:
        """Make `choice` the set the next calls run with (a no-op when it already is)."""
        if choice == self.active:
            return
        unknown = [n for n, _ in choice if n not in self.ids]
        if unknown:
            raise ValueError(f"loras: {unknown[0]!r} is not loaded here; loaded: {', '.join(self.ids) or 'none'}")
        if choice:
            self.transformer.enable_adapters()
            self.transformer.set_adapters([self.ids[n] for n, _ in choice], weights=[s for _, s in choice])
        else:
            self.transformer.disable_adapters()
        self.active = choice
