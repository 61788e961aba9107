"""What can be known about an engine before a GPU builds it: the FP8 pattern TensorRT fuses, the opset,
and a worst-case estimate of each profile's activation memory.

The estimate is arithmetic on the checkpoint's configs at a profile's largest shape, in BF16 (every
engine computes in BF16; the FP32 boundaries are small). Attention is counted two ways: fused (flash
attention: memory linear in the sequence) and unfused (scores and probabilities, B x heads x S^2 each).
TensorRT fuses attention whose head size its kernels take; the VAE's mid-block attention, one head of
512 channels, is counted unfused. bench/h100_tensorrt.sh's layer dump shows what the GPU really fused.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint import Checkpoint
from ..sizes import PIXELS_PER_TOKEN_SIDE, TEXT_TOKENS
from ..specs import NetworkSpec, Profile

BYTES = 2  # BF16 activations
# Head sizes up to which TensorRT's fused attention kernels apply (flash attention's limit); above it the
# estimate counts the S^2 scores.
FUSED_HEAD_DIM_MAX = 256
# Per profile, for one execution context: an H100's 80 GB less the weights of all four engines (the
# text encoder's 8 GB in BF16, the DiT's 4 GB in FP8, the VAE's), CUDA graphs and Triton's own use.
ACTIVATION_BUDGET_BYTES = 48 << 30
VAE_DOWNSAMPLE = 8  # the VAE's latent grid is 1/8 of the pixels (4 levels)


@dataclass(frozen=True)
class Estimate:
    network: str
    profile: str
    activations: int  # the largest tensors live at once, attention fused
    attention_scores: int  # B x heads x S^2, scores and probabilities, if attention is not fused
    fused: bool  # whether the estimate takes attention as fused (head size <= FUSED_HEAD_DIM_MAX)

    @property
    def bytes(self) -> int:
        return self.activations + (0 if self.fused else self.attention_scores)


def _transformer_like(batch: int, seq: int, hidden: int, ff: int, heads: int) -> tuple[int, int]:
    # Within a block: the input, Q, K, V, the attention output and the MLP's inner activation, live at once.
    linear = batch * seq * (5 * hidden + 2 * ff) * BYTES
    scores = 2 * batch * heads * seq * seq * BYTES
    return linear, scores


def activation_estimate(spec: NetworkSpec, ckpt: Checkpoint, profile: Profile) -> Estimate:
    """Worst case for `profile` at its largest shape; see the module docstring for what is counted."""
    top = {k: v[2] for k, v in profile.dims.items()}
    if spec.name == "transformer":
        cfg = ckpt.transformer
        heads, head_dim = int(cfg["num_attention_heads"]), int(cfg["attention_head_dim"])
        hidden = heads * head_dim
        linear, scores = _transformer_like(top["batch"], top["tokens"] + TEXT_TOKENS, hidden,
                                           int(hidden * float(cfg["mlp_ratio"])), heads)
    elif spec.name == "text_encoder":
        cfg = ckpt.text_encoder
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        linear, scores = _transformer_like(top["batch"], TEXT_TOKENS, int(cfg["hidden_size"]),
                                           int(cfg["intermediate_size"]), heads)
    elif spec.name in ("vae_decoder", "vae_encoder"):
        if spec.name == "vae_decoder":
            height, width = top["rows"] * PIXELS_PER_TOKEN_SIDE, top["cols"] * PIXELS_PER_TOKEN_SIDE
        else:
            height, width = top["height"], top["width"]
        channels = [int(c) for c in ckpt.vae["block_out_channels"]]
        # At full resolution the widest convolution has the first two levels' channels (the decoder
        # upsamples the second level's into it); input, output and the residual are live at once.
        linear = 3 * height * width * max(channels[:2]) * BYTES
        seq = (height // VAE_DOWNSAMPLE) * (width // VAE_DOWNSAMPLE)
        head_dim, scores = channels[-1], 2 * seq * seq * BYTES
        linear += 4 * seq * channels[-1] * BYTES
    else:
        raise KeyError(spec.name)
    return Estimate(spec.name, profile.name, linear, scores, fused=head_dim <= FUSED_HEAD_DIM_MAX)


def instance_estimate(spec: NetworkSpec, ckpt: Checkpoint) -> int:
    """One Triton instance of the engine: one execution context per profile, each sized for its own
    profile (ON_PROFILE_CHANGE), so the sum over profiles once every profile has served."""
    return sum(activation_estimate(spec, ckpt, p).bytes for p in spec.profiles)


# -- the ONNX graph ------------------------------------------------------------------------------------------

def fp8_pattern_problems(model) -> list[str]:
    """Where an FP8 graph departs from what TensorRT fuses into FP8 GEMMs: every DequantizeLinear of an
    FP8 weight feeds MatMul nodes only, with nothing (no Cast) between; every Q/DQ scale is a constant
    scalar. Empty when the graph is right."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    problems = []

    def scale_of(node):
        name = node.input[1]
        if name in inits:
            return inits[name]
        if name in constants:
            attr = next((a for a in constants[name].attribute if a.name == "value"), None)
            return attr.t if attr is not None else None
        return None

    fp8_weights = {n for n, i in inits.items() if i.data_type == TensorProto.FLOAT8E4M3FN and i.dims}
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = scale_of(node)
        if scale is None:
            problems.append(f"{node.name}: scale {node.input[1]!r} is computed, not a constant")
        elif list(scale.dims) not in ([], [1]):
            problems.append(f"{node.name}: scale {node.input[1]!r} has shape {list(scale.dims)}, not a scalar")
        elif node.op_type == "DequantizeLinear" and numpy_helper.to_array(scale).size != 1:
            problems.append(f"{node.name}: scale {node.input[1]!r} is not one value")
        if node.op_type == "DequantizeLinear" and node.input[0] in fp8_weights:
            users = consumers.get(node.output[0], [])
            bad = sorted({u.op_type for u in users if u.op_type != "MatMul"})
            if not users or bad:
                problems.append(f"{node.name}: the FP8 weight {node.input[0]!r} feeds {bad or 'nothing'}, "
                                "not a MatMul directly")
    if not fp8_weights:
        problems.append("no FP8 weights in the graph")
    return problems


def opset_of(model) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
