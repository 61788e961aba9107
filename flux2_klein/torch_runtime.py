"""The PyTorch leaves' runtime: a network's wrapper (networks.py) with FP8 GEMMs (torchao), torch.compile, and
every shape it serves warmed while it loads, so that no request pays for a compile. No transport here: the Triton
glue (model_repository/torch_leaf.py), the GPU tests and the benchmark call it.

FP8: torchao's float8 inference (`Float8DynamicActivationFloat8WeightConfig`, per-row scales): weights in
E4M3 with a scale per output row, computed once at load; activations quantized on the fly with a scale per
token row, so no calibration set is needed and no scale goes stale. The GEMMs run on FP8 tensor cores
(compute capability 8.9+: Ada, Hopper); torchao refuses elsewhere, and so does this module, by name. The DiT
keeps in BF16 exactly the layers `export fp8` keeps there (networks.py KEEP_HIGH_PRECISION); the text
encoder quantizes its decoder layers' projections only.

Compile: dynamic shapes for the networks whose shapes vary between requests (the DiT's token count and
batch, the VAE's grid), static for the text encoder (always [1, 512]). CUDA graphs are not used: the DiT
and the VAE at a megapixel keep the GPU busy for tens of milliseconds per call, so launch overhead is noise,
and a graph's output pool would be overwritten while Triton still holds the previous answer.

Warm-up runs each shape with the dtypes the served repository sends (the leaf's Triton config: bf16 at the
bf16 boundary, triton_config.BF16_BOUNDARY), since dynamo guards on dtype: a float32 warm-up would leave
every bf16 request to compile again. It runs twice when compiled, and a second pass that compiles anything
fails the load (a warm-up that does not hold). After it, flux2_klein/leaf_timing.py counts what requests
compile. FLUX2_KLEIN_COMPILE_BACKEND picks torch.compile's backend (default inductor); "eager" runs dynamo
and its guards without code generation, which is what the CPU tests use.

Inductor and cuDNN settings have one home, `configure_torch`, called by every leaf and by the bench's
diffusers baseline alike.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .dtypes import torch_dtype
from .leaf_timing import LeafMonitor, compile_count
from .ort_session import keep_freed_memory
from .repository import COMPILE_MODES
from .sizes import MAX_REFERENCES, SIZES, parse_size

# Networks whose GEMMs may run in FP8, and which of their Linear layers do.
FP8_NETWORKS = ("transformer", "text_encoder")
# Networks whose input shapes vary from request to request: compiled with dynamic shapes.
DYNAMIC = ("transformer", "vae_decoder", "vae_encoder")
# torch.compile's backend; tests set "eager" (dynamo and its guards, no code generation).
COMPILE_BACKEND_ENV = "FLUX2_KLEIN_COMPILE_BACKEND"

# Inductor, chosen on purpose and set in one place for our leaves and the diffusers baseline alike.
# torchao's quantize_ would otherwise set its own for the whole process: every float8 config defaults to
# set_inductor_config=True, whose transform calls torchao.quantization.utils.recommended_inductor_config_setter
# (coordinate-descent tuning on, with every direction checked; pytorch/ao v0.18.0,
# torchao/quantization/quant_api.py `_float8_dynamic_activation_float8_weight_transform`, and
# torchao/quantization/utils.py). Coordinate descent benchmarks each kernel's launch parameters at its first
# launch: minutes more per compiled shape inside the ready timeout, and on our side only. We keep inductor's
# defaults for it (off), and the FX graph cache on (a rebuild of the same graphs reuses their code).
INDUCTOR_CONFIG = {"coordinate_descent_tuning": False, "coordinate_descent_check_all_directions": False,
                   "fx_graph_cache": True}
# Inductor compiles kernels in a worker pool of min(32, cores) per process (torch/_inductor/config.py
# decide_compile_threads): four leaf stubs compiling at once would start 4 x 16 workers on a 16-core machine.
COMPILING_PROCESSES = 4


def fp8_layers(network: str, root: nn.Module) -> list[str]:
    """Names (relative to `root`, the raw diffusers / transformers module) of the Linear layers that take FP8."""
    if network == "transformer":
        from .networks import KEEP_HIGH_PRECISION

        keep = lambda name: any(fnmatch.fnmatch(name, p) for p in KEEP_HIGH_PRECISION)  # noqa: E731
        return [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and not keep(n)]
    if network == "text_encoder":
        return [n for n, m in root.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")]
    raise ValueError(f"fp8: {network!r} has no FP8 GEMMs here; allowed: {', '.join(FP8_NETWORKS)}")


def fp8_root(wrapper: nn.Module, network: str) -> nn.Module:
    """The raw diffusers / transformers module inside a wrapper of networks.py (what fp8_layers names are relative
    to)."""
    return wrapper.transformer if network == "transformer" else wrapper.model


def configure_torch(dtype: str, processes: int = COMPILING_PROCESSES) -> dict:
    """Inductor's and cuDNN's settings for this process, the same for a leaf and for the bench's diffusers
    baseline; return them (for the log and the report). `dtype` is the leaves' compute dtype: fp32 is the
    parity path, so it runs exact (no TF32, cuDNN's deterministic heuristic choice instead of per-shape
    benchmarking, on both sides of a comparison); bf16 and fp16 let cuDNN benchmark its convolution
    algorithms per shape (the VAE's, while warming). `processes`: how many processes compile at once on this
    machine (the leaves' stubs), to share its cores between their inductor worker pools."""
    import torch._inductor.config as inductor

    workers = max(1, (os.cpu_count() or 1) // max(processes, 1))
    for key, value in INDUCTOR_CONFIG.items():
        setattr(inductor, key, value)
    inductor.compile_threads = workers  # read when the pool starts, at the first compile
    exact = dtype == "fp32"
    torch.backends.cudnn.benchmark = not exact
    torch.backends.cudnn.allow_tf32 = not exact
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's default; stated, since fp32 parity depends on it
    return {**INDUCTOR_CONFIG, "compile_threads": workers, "cudnn_benchmark": not exact, "tf32": False if exact else
            "cudnn only"}


def fp8_quantized(root: nn.Module) -> list[str]:
    """Names of `root`'s modules whose weight torchao turned into a float8 tensor (torchao.quantization's
    Float8Tensor, what Float8DynamicActivationFloat8WeightConfig version 2 makes)."""
    from torchao.quantization import Float8Tensor

    return [n for n, m in root.named_modules() if isinstance(getattr(m, "weight", None), Float8Tensor)]


def quantize_fp8(root: nn.Module, network: str) -> list[str]:
    """Swap `root`'s chosen Linear layers (fp8_layers) for FP8 ones (E4M3 weights, per-row scales) in place;
    return the names of those torchao actually quantized. torchao leaves a layer in high precision, silently,
    when its shape does not suit torch._scaled_mm (a side not a multiple of 16: `_fp8_mm_compat` in pytorch/ao
    v0.18.0 torchao/quantization/utils.py, called from quant_api.py's float8 transform), so the chosen list
    alone would overstate it. `root` is the raw
    module (diffusers' Flux2Transformer2DModel, or the text encoder's Qwen3 model), so the same call serves
    our leaves and a diffusers pipeline alike. Inductor's settings stay configure_torch's
    (set_inductor_config=False)."""
    device = next(root.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(f"fp8: {network} needs a GPU of compute capability 8.9 or more (Ada, Hopper); "
                           f"this instance runs on {device}")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    chosen = set(fp8_layers(network, root))
    quantize_(root, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False),
              filter_fn=lambda module, name: name in chosen)
    return sorted(set(fp8_quantized(root)) & chosen)


@dataclass(frozen=True)
class WarmShapes:
    """What to warm: output sizes (width, height) and DiT batch sizes; references at 1024x1024 each."""

    sizes: tuple[tuple[int, int], ...] = ()
    batches: tuple[int, ...] = (1,)
    references: int = MAX_REFERENCES

    @classmethod
    def parse(cls, text: str, max_rows: int = 1, references: int = MAX_REFERENCES) -> WarmShapes:
        """"" (nothing), "all" (the 17 sizes) or "WxH,WxH"; batches 1, 2 and `max_rows` (dynamic shapes:
        these cover every batch in between without another compile); 1..`references` references (0: none,
        and the VAE encoder warms nothing: a repository that is sent no references)."""
        text = text.strip()
        if not 0 <= references <= MAX_REFERENCES:
            raise ValueError(f"warm_references: {references} is not in 0..{MAX_REFERENCES}")
        if not text:
            return cls()
        sizes = SIZES if text == "all" else tuple(parse_size(s, "warm_sizes") for s in text.split(","))
        return cls(tuple(sizes), tuple(sorted({1, min(2, max_rows), max_rows})), references)


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
        return [example_inputs(spec, rng, references=(s,)) for s in shapes.sizes] if shapes.references else []
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
    backend = os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    return torch.compile(module, mode=mode, dynamic=network in DYNAMIC, backend=backend)


def served_spec(spec, input_dtypes: dict[str, str] | None):
    """`spec` with its inputs in the dtypes the leaf's Triton config declares (Triton admits no other)."""
    if not input_dtypes:
        return spec
    unknown = set(input_dtypes) - set(spec.input_names)
    if unknown:
        raise ValueError(f"{spec.name}: the config names inputs the network lacks: {sorted(unknown)}")
    return dataclasses.replace(spec, inputs=tuple(dataclasses.replace(t, dtype=input_dtypes.get(t.name, t.dtype))
                                                  for t in spec.inputs))


def as_served(example: dict[str, np.ndarray], spec, device: torch.device) -> list[torch.Tensor]:
    """Example arrays as the tensors a request brings: each input in its spec dtype, on `device`. Call it in
    inference mode, as the leaf reads a request's inputs (from DLPack, inside torch.inference_mode: inference
    tensors): dynamo guards on a tensor's dispatch keys, and an ordinary tensor's differ."""
    return [torch.from_numpy(example[t.name]).to(device=device, dtype=torch_dtype(t.dtype)) for t in spec.inputs]


@torch.inference_mode()
def warm(module: nn.Module, spec, device: torch.device, shapes: WarmShapes, monitor: LeafMonitor | None = None,
         check: bool = False) -> tuple[int, float]:
    """Run `module` on every shape it must serve, with the dtypes `spec` states (served_spec); return (shapes
    run, seconds). With `check` (a compiled module), run them all again: a second pass that compiles
    anything means the guards do not hold, and the load fails rather than a request paying for it."""
    start = time.perf_counter()
    inputs = warm_inputs(spec, shapes)
    call = monitor.call if monitor is not None else (lambda fn, *a: fn(*a))
    for example in inputs:
        call(module, *as_served(example, spec, device))
    if check and inputs:
        before = compile_count()
        for example in inputs:
            module(*as_served(example, spec, device))
        if compile_count() != before:
            raise RuntimeError(f"{spec.name}: warm-up does not hold: a second pass over its {len(inputs)} shapes "
                               f"compiled {compile_count() - before} graph(s) again")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(inputs), time.perf_counter() - start


@dataclass
class Leaf:
    """A loaded network and what it took: the module to call, a line for the log, and the monitor that
    times its calls and counts their compiles (call the network through `leaf(*args)`)."""

    module: nn.Module
    summary: str
    monitor: LeafMonitor
    adapters: object = None  # lora_library.Adapters: the DiT's LoRA library, when its repository has one

    def __call__(self, *args):
        return self.monitor.call(self.module, *args)


def load_leaf(checkpoint: str, network: str, *, dtype: str, device: torch.device, fp8: bool = False,
              compile_mode: str = "", warm_shapes: WarmShapes = WarmShapes(),
              input_dtypes: dict[str, str] | None = None, lora_library=None) -> Leaf:
    """The network's wrapper (networks.py) on `device`: weights in `dtype`, FP8 GEMMs if asked, compiled if asked,
    warmed on `warm_shapes` with its inputs in `input_dtypes` (name -> spec dtype name, the leaf's Triton
    config; default the spec's float32 boundary). `lora_library` (lora_library.Library, the transformer
    only): every LoRA of it loaded as an unfused adapter, all disabled until a call activates its set."""
    from .checkpoint import load_checkpoint
    from .networks import load_wrapper
    from .specs import network_specs

    start = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    module = load_wrapper(ckpt, network, torch_dtype(dtype)).to(device).requires_grad_(False)
    notes = [f"{dtype} on {device}"]
    if device.type == "cpu":
        # Torch's CPU tensors come from glibc malloc: every large activation a fresh mmap, zeroed by page faults
        # on each call, as for the ONNX Runtime leaves (ort_session.py). Kept instead, a 1024x1024 VAE decode in
        # its Triton stub took 803-825 ms against 1,360-1,499 (tiny checkpoint, 4 steps, A B A B, 2026-12-03);
        # the text encoder and the DiT did not move. The cost is the same: the heap stays at its peak.
        notes.append(keep_freed_memory())
    adapters = None
    if lora_library is not None:
        from .lora_library import Adapters

        if network != "transformer" or fp8 or compile_mode:
            raise ValueError(f"lora_library: the eager DiT without FP8 takes LoRAs, not {network} (fp8={fp8}, "
                             f"compile={compile_mode!r})")
        adapters = Adapters(module.transformer, lora_library)
        module.to(device).requires_grad_(False)  # the adapters' weights where the base weights are
        notes.append(f"LoRA library of {len(adapters.names)} unfused: {', '.join(adapters.names)}")
    if fp8:
        chosen = fp8_layers(network, fp8_root(module, network))
        done = quantize_fp8(fp8_root(module, network), network)
        notes.append(f"FP8 GEMMs in {len(done)} of {len(chosen)} chosen layers")
    if compile_mode:
        module = compile_module(module, network, compile_mode)
        notes.append(f"torch.compile {compile_mode}")
    loaded = time.perf_counter() - start
    monitor = LeafMonitor(device)
    spec = served_spec(network_specs(ckpt)[network], input_dtypes)
    count, seconds = warm(module, spec, device, warm_shapes, monitor, check=bool(compile_mode))
    monitor.warmed()
    notes.append(f"loaded in {loaded:.1f} s, {count} shapes warmed in {seconds:.1f} s")
    if compile_mode:
        notes.append(f"{monitor.warm_compiles} graphs compiled while warming")
    return Leaf(module, f"{network}: " + ", ".join(notes), monitor, adapters)
