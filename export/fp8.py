"""`flux2-klein export fp8`: the DiT with FP8 (E4M3) GEMMs, as ONNX with Q/DQ that TensorRT fuses.

1. Calibrate with NVIDIA ModelOpt: `mtq.quantize` with its FP8 recipe (per-tensor E4M3 weights and
   activations, max calibration) while the real pipeline runs: the checkpoint's own step count, several
   of the 17 sizes, text-to-image and editing with an earlier image as the reference, over the prompts
   shipped in calibration_prompts.txt.
2. Keep in higher precision what FP8 recipes for Flux keep there (networks.KEEP_HIGH_PRECISION, which the
   torch leaves' FP8 follows too): the input embedders, the timestep embedding and the modulation MLPs,
   norm_out and proj_out; norms are never quantized (not Linear).
3. Replace every calibrated Linear by an explicit Q/DQ module: the activation passes QuantizeLinear ->
   DequantizeLinear (E4M3, scale = amax / 448), the weight is stored in E4M3 and dequantized, both
   feeding the MatMul directly. That is the pattern TensorRT's explicit quantization fuses into one FP8
   GEMM; the weights also take half the bytes of BF16 on disk and in the engine.
ONNX Runtime runs the same Q/DQ on a CPU, so FP8 accuracy is measured there against the float graph.
"""

from __future__ import annotations

import fnmatch

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_checkpoint
from ..dtypes import torch_dtype
from ..networks import KEEP_HIGH_PRECISION, load_wrapper
from ..progress import step
from ..specs import network_specs

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")
# Sizes the calibration runs at: square, the two extremes, and two in between (width, height).
CALIBRATION_SIZES = ((1024, 1024), (672, 1568), (1568, 672), (832, 1248), (1184, 880))


# -- Q/DQ as custom ops: exact fake quantisation in torch, QuantizeLinear/DequantizeLinear in ONNX ----------

@torch.library.custom_op("flux2::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(x.dtype) * scale


@fp8_qdq.register_fake
def _(x, scale):
    return torch.empty_like(x)


@torch.library.custom_op("flux2::fp8_dq", mutates_args=())
def fp8_dq(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(scale.dtype) * scale


@fp8_dq.register_fake
def _(q, scale):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


def onnx_translations() -> dict:
    """torch.onnx (dynamo) translations of the two ops into standard ONNX Q/DQ nodes (opset >= 19)."""
    from onnx import TensorProto, helper
    from onnxscript import opset19 as op

    zero = helper.make_tensor("zero_point", TensorProto.FLOAT8E4M3FN, [], [0])

    def qdq(x, scale):
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, op.Constant(value=zero)), scale)

    def dq(q, scale):
        return op.DequantizeLinear(q, scale)

    return {torch.ops.flux2.fp8_qdq.default: qdq, torch.ops.flux2.fp8_dq.default: dq}


class QDQLinear(nn.Module):
    """y = QDQ(x) @ DQ(W_e4m3) + b, with per-tensor scales from calibration."""

    def __init__(self, linear: nn.Linear, input_amax: float, weight_amax: float):
        super().__init__()
        dtype = linear.weight.dtype
        w_scale = torch.tensor(max(weight_amax, 1e-12) / E4M3_MAX, dtype=torch.float32)
        self.register_buffer("input_scale", torch.tensor(max(input_amax, 1e-12) / E4M3_MAX).to(dtype))
        self.register_buffer("weight_scale", w_scale.to(dtype))
        # Stored transposed ([in, out]) so that DequantizeLinear feeds MatMul with nothing in between.
        w = (linear.weight.detach().float().t() / w_scale).clamp(-E4M3_MAX, E4M3_MAX)
        self.register_buffer("weight_e4m3", w.contiguous().to(torch.float8_e4m3fn))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.flux2.fp8_qdq(x, self.input_scale.to(x.dtype)) @ torch.ops.flux2.fp8_dq(
            self.weight_e4m3, self.weight_scale.to(x.dtype))
        return y if self.bias is None else y + self.bias


# -- calibration -------------------------------------------------------------------------------------------

@dataclass
class CalibrationPlan:
    prompts: list[str]
    sizes: tuple[tuple[int, int], ...] = CALIBRATION_SIZES
    steps: int | None = None  # the checkpoint's own default when None
    seed: int = 0
    runs: list[dict] = field(default_factory=list)  # filled in: what actually ran


def load_prompts(path: Path = PROMPTS_FILE, limit: int | None = None) -> list[str]:
    lines = [l.strip() for l in Path(path).read_text().splitlines()]
    prompts = [l for l in lines if l and not l.startswith("#")]
    if not prompts:
        raise ValueError(f"calibration prompts: {path} has none")
    return prompts[:limit] if limit else prompts


def quant_config() -> dict:
    import copy

    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + [
        {"quantizer_name": f"{pattern}", "enable": False} for pattern in KEEP_HIGH_PRECISION
    ]
    return cfg


def calibrate(pipe, plan: CalibrationPlan) -> None:
    """Quantize pipe.transformer in place with ModelOpt, calibrating on the real pipeline."""
    import modelopt.torch.quantization as mtq
    from PIL import Image

    steps = plan.steps or (4 if pipe.config.is_distilled else 50)

    def forward_loop(_model):
        last_image = None
        for i, prompt in enumerate(plan.prompts):
            width, height = plan.sizes[i % len(plan.sizes)]
            editing = prompt.startswith("edit: ")
            if editing and last_image is None:
                continue
            text = prompt[len("edit: "):] if editing else prompt
            out = pipe(prompt=text, image=[last_image] if editing else None, width=width, height=height,
                       num_inference_steps=steps, guidance_scale=1.0 if pipe.config.is_distilled else 4.0,
                       generator=torch.Generator("cpu").manual_seed(plan.seed + i))
            if not editing:
                last_image = out.images[0]
            plan.runs.append({"prompt": text, "size": [width, height], "references": int(editing)})
            log.info("calibration %d/%d: %dx%d%s", i + 1, len(plan.prompts), width, height,
                     " with a reference" if editing else "")
        assert last_image is None or isinstance(last_image, Image.Image)

    mtq.quantize(pipe.transformer, quant_config(), forward_loop)


def collect_amax(calibrated: nn.Module) -> dict[str, dict]:
    """Per Linear whose weight and input quantizers both calibrated: the activation and weight amax."""
    found = {}
    for name, module in calibrated.named_modules():
        wq, iq = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
        if wq is None or iq is None or not (wq.is_enabled and iq.is_enabled) or iq.amax is None:
            continue
        found[name] = {"input_amax": float(iq.amax), "weight_amax": float(module.weight.detach().abs().max())}
    return found


def to_qdq(transformer: nn.Module, scales: dict[str, dict]) -> None:
    """Swap the named Linears of a clean (never quantized) transformer for QDQLinear, in place.

    A clean copy rather than ModelOpt's own modules: its quantizer wrappers hold state the exporter
    cannot trace, and the ONNX graph should contain exactly our Q/DQ and nothing else of calibration."""
    for name, amax in scales.items():
        linear = transformer.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected a Linear to quantize, found {type(linear).__name__}")
        parent_name, _, child = name.rpartition(".")
        parent = transformer.get_submodule(parent_name) if parent_name else transformer
        setattr(parent, child, QDQLinear(linear, amax["input_amax"], amax["weight_amax"]))


def kept_high_precision(names: list[str]) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in KEEP_HIGH_PRECISION)]


def calibrate_scales(checkpoint: str | Path, *, dtype: str = "bf16", prompts: list[str] | None = None,
                     sizes=CALIBRATION_SIZES, steps: int | None = None) -> tuple[dict[str, dict], int]:
    """Run the real pipeline under ModelOpt; returns (per-layer amax, calibration runs)."""
    from diffusers import Flux2KleinPipeline

    ckpt = load_checkpoint(checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with step(f"load the pipeline ({dtype}, {device}) for calibration"):
        pipe = Flux2KleinPipeline.from_pretrained(ckpt.path, dtype=torch_dtype(dtype)).to(device)
        pipe.set_progress_bar_config(disable=True)
    plan = CalibrationPlan(prompts=prompts or load_prompts(), sizes=tuple(sizes), steps=steps)
    with step(f"calibrate FP8 on {len(plan.prompts)} prompts"), torch.no_grad():
        calibrate(pipe, plan)
    scales = collect_amax(pipe.transformer)
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()  # the engine builds that follow want the GPU's memory
    return scales, len(plan.runs)


def export_fp8(checkpoint: str | Path, out_dir: str | Path, *, dtype: str = "bf16",
               prompts: list[str] | None = None, sizes=CALIBRATION_SIZES, steps: int | None = None,
               scales: dict[str, dict] | None = None) -> Path:
    """Calibrate (unless `scales` are given, or out_dir/transformer/fp8_scales.json holds an earlier
    calibration), convert and export the FP8 transformer to out_dir/transformer/model.onnx."""
    from .onnx_export import export_module

    ckpt = load_checkpoint(checkpoint)
    spec = network_specs(ckpt)["transformer"]
    target = Path(out_dir) / spec.name
    saved = target / "fp8_scales.json"
    runs = None
    if scales is None and saved.is_file():
        # An hour of calibration on the real model: kept as soon as it is done, reused by a resumed build.
        log.info("FP8 scales: reusing %s", saved)
        scales = json.loads(saved.read_text())
    elif scales is None:
        scales, runs = calibrate_scales(checkpoint, dtype=dtype, prompts=prompts, sizes=sizes, steps=steps)
    target.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(scales, indent=1))
    with step("replace calibrated layers by FP8 Q/DQ"):
        module = load_wrapper(ckpt, "transformer", torch_dtype(dtype))
        to_qdq(module.transformer, scales)
    kept = sorted({n for n, _ in module.transformer.named_children() if kept_high_precision([n])})
    log.info("FP8 layers: %d; kept in %s: %s", len(scales), dtype, ", ".join(kept))
    return export_module(module, ckpt, spec, target, dtype, precision="fp8", translations=onnx_translations(),
                         extra_meta={"fp8_layers": len(scales), "calibration_runs": runs,
                                     "kept_high_precision": list(KEEP_HIGH_PRECISION)})
