"""The PyTorch leaves' runtime: a network's export wrapper with FP8 GEMMs (torchao), torch.compile, and every
shape it serves warmed while it loads, so that no request pays for a compile. No transport here: the Triton
glue (model_repository/torch_leaf.py), the GPU tests and the benchmark call it.

FP8: torchao's float8 inference (`Float8DynamicActivationFloat8WeightConfig`, per-row scales): weights in
E4M3 with a scale per output row, computed once at load; activations quantized on the fly with a scale per
token row, so no calibration set is needed and no scale goes stale. The GEMMs run on FP8 tensor cores
(compute capability 8.9+: Ada, Hopper); torchao refuses elsewhere, and so does this module, by name. The DiT
keeps in BF16 exactly the layers `export fp8` keeps there (export/fp8.py KEEP_HIGH_PRECISION); the text
encoder quantizes its decoder layers' projections only.

Compile: dynamic shapes for the networks whose shapes vary between requests (the DiT's token count and
batch, the VAE's grid), static for the text encoder (always [1, 512]). CUDA graphs are not used: the DiT
and the VAE at a megapixel keep the GPU busy for tens of milliseconds per call, so launch overhead is noise,
and a graph's output pool would be overwritten while Triton still holds the previous answer.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .repository import COMPILE_MODES
from .sizes import MAX_REFERENCES, SIZES, parse_size

# Networks whose GEMMs may run in FP8, and which of their Linear layers do.
FP8_NETWORKS = ("transformer", "text_encoder")
# Networks whose input shapes vary from request to request: compiled with dynamic shapes.
DYNAMIC = ("transformer", "vae_decoder", "vae_encoder")


def fp8_layers(network: str, root: nn.Module) -> list[str]:
    """Names (relative to `root`, the raw diffusers / transformers module) of the Linear layers that take FP8."""
    if network == "transformer":
        from .export.fp8 import KEEP_HIGH_PRECISION

        keep = lambda name: any(fnmatch.fnmatch(name, p) for p in KEEP_HIGH_PRECISION)  # noqa: E731
        return [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and not keep(n)]
    if network == "text_encoder":
        return [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")]
    raise ValueError(f"fp8: {network!r} has no FP8 GEMMs here; allowed: {', '.join(FP8_NETWORKS)}")


def fp8_root(wrapper: nn.Module, network: str) -> nn.Module:
    """The raw diffusers / transformers module inside an export wrapper (what fp8_layers names are relative to)."""
    return wrapper.transformer if network == "transformer" else wrapper.model


def quantize_fp8(root: nn.Module, network: str) -> list[str]:
    """Swap `root`'s chosen Linear layers (fp8_layers) for FP8 ones (E4M3 weights, per-row scales) in place;
    return their names. `root` is the raw module (diffusers' Flux2Transformer2DModel, or the text encoder's
    Qwen3 model), so the same call serves our leaves and a diffusers pipeline alike."""
    device = next(root.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(f"fp8: {network} needs a GPU of compute capability 8.9 or more (Ada, Hopper); "
                           f"this instance runs on {device}")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    chosen = set(fp8_layers(network, root))
    quantize_(root, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda module, name: name in chosen)
    return sorted(chosen)


@dataclass(frozen=True)
class WarmShapes:
    """What to warm: output sizes (width, height) and DiT batch sizes; references at 1024x1024 each."""

    sizes: tuple[tuple[int, int], ...] = ()
    batches: tuple[int, ...] = (1,)
    references: int = MAX_REFERENCES

    @classmethod
    def parse(cls, text: str, max_rows: int = 1) -> WarmShapes:
        """"" (nothing), "all" (the 17 sizes) or "WxH,WxH"; batches 1, 2 and `max_rows` (dynamic shapes:
        these cover every batch in between without another compile)."""
        text = text.strip()
        if not text:
            return cls()
        sizes = SIZES if text == "all" else tuple(parse_size(s, "warm_sizes") for s in text.split(","))
        return cls(tuple(sizes), tuple(sorted({1, min(2, max_rows), max_rows})))


def warm_inputs(spec, shapes: WarmShapes) -> list[dict[str, np.ndarray]]:
    """Example inputs for every shape `spec`'s network must serve under `shapes`."""
    from .specs import example_inputs

    rng = np.random.default_rng(0)
    # Batches and references are warmed at one size (dynamic shapes cover the rest): the default one if warmed.
    first = ((1024, 1024),) if (1024, 1024) in shapes.sizes else shapes.sizes[:1]
    if spec.name == "text_encoder":
        return [example_inputs(spec, rng, batch=1)] if first else []
    if spec.name == "vae_decoder":
        return [example_inputs(spec, rng, size=s) for s in shapes.sizes]
    if spec.name == "vae_encoder":  # a reference comes resized to about a megapixel: the sizes' shapes
        return [example_inputs(spec, rng, references=(s,)) for s in shapes.sizes]
    if spec.name == "transformer":
        out = [example_inputs(spec, rng, batch=1, size=s) for s in shapes.sizes]
        out += [example_inputs(spec, rng, batch=b, size=s) for s in first for b in shapes.batches if b != 1]
        out += [example_inputs(spec, rng, batch=1, size=s, references=((1024, 1024),) * n)
                for s in first for n in range(1, shapes.references + 1)]
        return out
    raise KeyError(spec.name)


def compile_module(module: nn.Module, network: str, mode: str) -> nn.Module:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile: mode {mode!r} is not supported; allowed: {', '.join(COMPILE_MODES)}")
    return torch.compile(module, mode=mode, dynamic=network in DYNAMIC)


@torch.inference_mode()
def warm(module: nn.Module, spec, device: torch.device, shapes: WarmShapes) -> tuple[int, float]:
    """Run `module` once on every shape it must serve; return (shapes run, seconds)."""
    start = time.perf_counter()
    inputs = warm_inputs(spec, shapes)
    for example in inputs:
        module(*(torch.from_numpy(example[t.name]).to(device) for t in spec.inputs))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(inputs), time.perf_counter() - start


@dataclass
class Leaf:
    """A loaded network and what it took: the module to call, and a line for the log."""

    module: nn.Module
    summary: str


def load_leaf(checkpoint: str, network: str, *, dtype: str, device: torch.device, fp8: bool = False,
              compile_mode: str = "", warm_shapes: WarmShapes = WarmShapes()) -> Leaf:
    """The network's export wrapper on `device`: weights in `dtype`, FP8 GEMMs if asked, compiled if asked,
    warmed on `warm_shapes`."""
    from .checkpoint import load_checkpoint
    from .export.onnx_export import DTYPES, load_wrapper
    from .specs import network_specs

    start = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    module = load_wrapper(ckpt, network, DTYPES[dtype]).to(device).requires_grad_(False)
    notes = [f"{dtype} on {device}"]
    if fp8:
        notes.append(f"FP8 GEMMs in {len(quantize_fp8(fp8_root(module, network), network))} layers")
    if compile_mode:
        module = compile_module(module, network, compile_mode)
        notes.append(f"torch.compile {compile_mode}")
    loaded = time.perf_counter() - start
    count, seconds = warm(module, network_specs(ckpt)[network], device, warm_shapes)
    notes.append(f"loaded in {loaded:.1f} s, {count} shapes warmed in {seconds:.1f} s")
    return Leaf(module, f"{network}: " + ", ".join(notes))
