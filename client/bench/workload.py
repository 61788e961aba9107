"""What the benchmark sends: its configuration and its requests (`Entry`), for perf_analyzer or tritonclient."""

from __future__ import annotations

import base64
import io
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flux2_klein.contract import input_arrays

from ..triton_client import DEFAULT_URLS

PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a red fox in fresh snow, telephoto photograph",
    "an isometric city block made of paper, soft light",
    "a bowl of ramen on a wooden table, steam rising",
    "a watercolor map of an imaginary archipelago",
    "a robot tending a rooftop garden at sunrise",
    "macro photograph of a dew-covered spider web",
    "a neon-lit alley in the rain, cinematic",
)


class BenchError(RuntimeError):
    """The benchmark could not run (server unreachable, perf_analyzer failed, ...); str() says why."""


@dataclass
class BenchConfig:
    """One run's settings; `cli.config_from_args` makes one from the flags."""

    url: str = DEFAULT_URLS["grpc"]
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8])
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 1024)])
    references: int = 0
    reference_size: tuple[int, int] = (1024, 1024)
    steps: int | None = None
    requests: int = 4  # per concurrency slot: a level measures requests x concurrency requests
    windows: bool = False
    stability: int = 20
    warmup: int = 2  # rounds: the first requests an ONNX Runtime session sees are slower (its arena grows)
    repository: Path | None = None
    direct: bool = True
    direct_threads: int | None = None
    load: str = "auto"  # auto | perf_analyzer | python
    out: Path = Path("out/bench")
    timeout_s: float | None = None  # per level
    wait_s: float = 0.0  # first wait up to this long for Triton and the model to be ready (`--wait`)
    progress: bool = True
    gateway: str | None = None  # the HTTP gateway's URL: also measure its own cost per request (bench/gateway.py)


def reference_image(index: int, width: int = 1024, height: int = 1024) -> bytes:
    """A deterministic PNG (gradients and a checkerboard) to stand in for a user's reference image."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    channels = [xx * 255 // width, yy * 255 // height, ((xx // 32 + yy // 32) % 2) * 200]
    k = index % 3
    pixels = np.stack(channels[k:] + channels[:k], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Entry:
    """One request of the benchmark."""

    prompt: str
    width: int
    height: int
    seed: int
    steps: int | None = None
    references: list[bytes] = field(default_factory=list)

    def kwargs(self) -> dict[str, Any]:
        """The arguments of `contract.input_arrays` (and the client's `build_inputs`) for this request."""
        return {"prompt": self.prompt, "width": self.width, "height": self.height, "seed": self.seed,
                "steps": self.steps, "references": self.references}

    def arrays(self) -> dict[str, tuple[str, np.ndarray]]:
        return input_arrays(**self.kwargs())

    def perf_analyzer_data(self) -> dict[str, Any]:
        """This request in perf_analyzer's --input-data JSON. BYTES inputs with binary content go as
        {"b64": ..., "shape": [N]}: perf_analyzer sends the decoded bytes as the tensor's raw data, so
        they must already be Triton's serialized BYTES tensor (each element a 4-byte little-endian
        length, then its bytes)."""
        data: dict[str, Any] = {}
        for name, (datatype, array) in self.arrays().items():
            if datatype != "BYTES":
                data[name] = array.tolist()
            elif name == "prompt":  # text: perf_analyzer sends a JSON string as its UTF-8 bytes
                data[name] = [item.decode("utf-8") for item in array]
            else:
                raw = b"".join(struct.pack("<I", len(item)) + item for item in array)
                data[name] = {"b64": base64.b64encode(raw).decode("ascii"), "shape": list(array.shape)}
        return data


def make_entries(count: int, sizes, references: list[bytes], salt: str, steps: int | None = None) -> list[Entry]:
    """`count` requests, each with its own prompt (salted, so the text encoder's response cache does not
    turn later levels into cache hits) and seed, the sizes taken in turn."""
    return [Entry(f"{PROMPTS[i % len(PROMPTS)]} [{salt}-{i}]", *sizes[i % len(sizes)], seed=i, steps=steps,
                  references=list(references)) for i in range(count)]

