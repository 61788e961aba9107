"""The public model's interface (docs/CONTRACT.md section 3), stated once: its name, its inputs with their
types, ranges and defaults, its output, and the request tensors a client sends.

The client, the gateway, the benchmark, request validation, the Triton configs and the checkpoint all
read these facts from here. This module imports nothing of the project but `sizes` and `dtypes`, so that any
of them can use it (the client without torch, the checkpoint reader without the specs).
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dtypes import DATATYPES  # KServe's names for the dtypes below, as requests carry them
from .sizes import DEFAULT_SIZE, SIZES

MODEL_NAME = "flux2_klein"  # the ensemble users call


@dataclass(frozen=True)
class ApiTensor:
    """One tensor of the public model. `dtype` is a numpy dtype name ("bytes": Triton's BYTES);
    `shape` holds ints (fixed) and names (dynamic). `optional`: Triton may let it through absent."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    optional: bool = False


# Every input is declared optional, `prompt` too: Triton does not check an ensemble's required inputs,
# and a request without one would stall the ensemble ("unexpected deadlock"); preprocess rejects a
# missing prompt by name.
INPUTS = (
    ApiTensor("prompt", "bytes", (1,), optional=True),
    ApiTensor("height", "int32", (1,), optional=True),
    ApiTensor("width", "int32", (1,), optional=True),
    ApiTensor("seed", "int64", (1,), optional=True),
    ApiTensor("num_inference_steps", "int32", (1,), optional=True),
    ApiTensor("guidance_scale", "float32", (1,), optional=True),
    ApiTensor("reference_images", "bytes", ("n",), optional=True),
    # NIM's field: skip the guardrail's image checks for this request, honoured only where the operator
    # allows it (docs/GUARDRAIL.md); the prompt check always runs.
    ApiTensor("disable_safety_checker", "bool", (1,), optional=True),
    # Inpainting and image-to-image (diffusers' Flux2KleinInpaintPipeline): the picture to change (the
    # pipeline's `image`; an ensemble's input may not share its output's name), the mask (white repaints,
    # black keeps; absent: the whole picture is repainted), how much to change it, the pipeline's
    # padding_mask_crop.
    ApiTensor("init_image", "bytes", (1,), optional=True),
    ApiTensor("mask_image", "bytes", (1,), optional=True),
    ApiTensor("strength", "float32", (1,), optional=True),
    ApiTensor("padding_mask_crop", "int32", (1,), optional=True),
    # LoRAs of the repository's library for this request, "name:scale,name" (flux2_klein/lora_library.py);
    # absent or "": none.
    ApiTensor("loras", "bytes", (1,), optional=True),
)
OUTPUT = ApiTensor("image", "uint8", ("height", "width", 3))
INPUT_NAMES = tuple(t.name for t in INPUTS)

MIN_STEPS, MAX_STEPS = 1, 100
DEFAULT_SEED = 0
DEFAULT_STEPS_DISTILLED, DEFAULT_STEPS_BASE = 4, 50
# Distilled checkpoints ignore guidance; base ones run classifier-free guidance with an empty negative prompt.
DEFAULT_GUIDANCE_DISTILLED, DEFAULT_GUIDANCE_BASE = 1.0, 4.0

# The pipeline's default strength; 0..1, where 1 starts from pure noise (the picture only conditions).
DEFAULT_STRENGTH = 0.8


def strength_steps(num_steps: int, strength: float) -> tuple[int, int]:
    """(first step, steps run) of a `num_steps` schedule cut by `strength`, as the inpaint pipeline's
    `get_timesteps` cuts it (diffusers v0.42.1, pipelines/flux2/pipeline_flux2_klein_inpaint.py): the
    schedule is built for all `num_steps` and the first `int(num_steps - min(num_steps * strength,
    num_steps))` steps are skipped, in the same Python-float arithmetic. Fewer than one step left (strength
    0, or so small that the product rounds away) is the pipeline's ValueError; callers refuse it by name."""
    init = min(num_steps * float(strength), num_steps)
    start = int(max(num_steps - init, 0))
    return start, num_steps - start


# What runs the leaf networks (`build --runtime`, CONTRACT.md section 2): ONNX Runtime (Python models, CPU),
# PyTorch (the checkpoint's modules, no export), TensorRT (engines for this GPU). The first is the default.
RUNTIMES = ("onnxruntime", "torch", "tensorrt")
# What the DiT's GEMMs run in on TensorRT (the rest stays BF16), and TensorRT's default: `build`, `export
# engines` and the container build FP8 unless told otherwise.
PRECISIONS = ("fp8", "bf16")
TENSORRT_PRECISION = "fp8"


@dataclass(frozen=True)
class Defaults:
    """What an absent optional input means; differs between distilled and base checkpoints."""

    height: int = DEFAULT_SIZE[1]
    width: int = DEFAULT_SIZE[0]
    seed: int = DEFAULT_SEED
    num_inference_steps: int = DEFAULT_STEPS_DISTILLED
    guidance_scale: float = DEFAULT_GUIDANCE_DISTILLED

    @classmethod
    def for_checkpoint(cls, is_distilled: bool) -> Defaults:
        if is_distilled:
            return cls(num_inference_steps=DEFAULT_STEPS_DISTILLED, guidance_scale=DEFAULT_GUIDANCE_DISTILLED)
        return cls(num_inference_steps=DEFAULT_STEPS_BASE, guidance_scale=DEFAULT_GUIDANCE_BASE)


def size_for_reference(width: int, height: int) -> tuple[int, int]:
    """The supported (width, height) nearest in aspect ratio to a width x height image: what an edit without
    `width` and `height` produces, from its first reference as sent (before any resize or crop). Nearness is
    measured on log(width / height), so 2:1 and 1:2 are equally far from 1:1; a tie goes to the earlier size."""
    target = math.log(width / height)
    return min(SIZES, key=lambda size: abs(math.log(size[0] / size[1]) - target))


Reference = bytes | bytearray | memoryview | str | os.PathLike


def read_reference(path: str | os.PathLike) -> bytes:
    """A reference image's file as the raw encoded bytes the server decodes itself (PNG, JPEG or WebP):
    never decoded or re-encoded here, so the server sees exactly the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference image not found: {path}")
    return path.read_bytes()


def _reference_bytes(ref: Reference) -> bytes:
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if isinstance(ref, (str, os.PathLike)):
        return read_reference(ref)
    raise TypeError(f"a reference image is encoded file bytes or a path; got {type(ref).__name__}")


def input_arrays(
    prompt: str,
    *,
    width: int | None = None,
    height: int | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    references: Iterable[Reference] = (),
    disable_safety_checker: bool | None = None,
    image: Reference | None = None,
    mask: Reference | None = None,
    strength: float | None = None,
    padding_mask_crop: int | None = None,
    loras=None,
) -> dict[str, tuple[str, np.ndarray]]:
    """The request's tensors as {input name: (KServe datatype, numpy array)}, in the contract's types.

    Inputs given as None (and an empty reference list) are left out, so the server's defaults apply.
    `image` (the picture to change, sent as `init_image`) and `mask` (`mask_image`: white repaints, black
    keeps) are encoded files or paths, sent as they are, like references. `loras`: "name:scale,name", or
    {name: scale}, or names and (name, scale) pairs (lora_library.format_choice).
    BYTES tensors are numpy object arrays of `bytes`: an 'S' array would drop trailing NUL bytes,
    which an encoded image may well end with.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str; got {type(prompt).__name__}")
    arrays: dict[str, tuple[str, np.ndarray]] = {
        "prompt": ("BYTES", np.array([prompt.encode("utf-8")], dtype=np.object_)),
    }

    def integer(name: str, value: Any, dtype: str) -> None:
        if value is None:
            return
        if isinstance(value, bool):
            raise TypeError(f"{name} must be an integer; got {value!r}")
        value = operator.index(value)  # TypeError for floats and strings, rather than truncating
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise ValueError(f"{name} must fit {DATATYPES[dtype]} ({info.min}..{info.max}); got {value}")
        arrays[name] = (DATATYPES[dtype], np.array([value], dtype=dtype))

    integer("height", height, "int32")
    integer("width", width, "int32")
    integer("seed", seed, "int64")
    integer("num_inference_steps", steps, "int32")
    if guidance is not None:
        if isinstance(guidance, bool):
            raise TypeError(f"guidance must be a number; got {guidance!r}")
        arrays["guidance_scale"] = (DATATYPES["float32"], np.array([float(guidance)], dtype=np.float32))

    integer("padding_mask_crop", padding_mask_crop, "int32")
    if strength is not None:
        if isinstance(strength, bool):
            raise TypeError(f"strength must be a number; got {strength!r}")
        arrays["strength"] = (DATATYPES["float32"], np.array([float(strength)], dtype=np.float32))
    for name, value in (("init_image", image), ("mask_image", mask)):
        if value is not None:
            one = np.empty([1], dtype=np.object_)
            one[0] = _reference_bytes(value)
            arrays[name] = ("BYTES", one)

    if loras is not None:
        from .lora_library import format_choice

        arrays["loras"] = ("BYTES", np.array([format_choice(loras).encode("utf-8")], dtype=np.object_))
    if disable_safety_checker is not None:
        if not isinstance(disable_safety_checker, (bool, np.bool_)):
            raise TypeError(f"disable_safety_checker must be a bool; got {disable_safety_checker!r}")
        arrays["disable_safety_checker"] = (DATATYPES["bool"], np.array([bool(disable_safety_checker)]))

    refs = [_reference_bytes(r) for r in references]
    if refs:
        data = np.empty([len(refs)], dtype=np.object_)  # element-wise, so numpy can't turn it into 'S'
        for i, ref in enumerate(refs):
            data[i] = ref
        arrays["reference_images"] = ("BYTES", data)
    return arrays
