"""Triton model configs (config.pbtxt text) generated from the network specs and the API's tensors.

Nothing here is hand-copied from a spec: the leaf models' tensors are the ONNX graphs' tensors, and
the ensemble wires them by name. Output is protobuf text format, which Triton reads directly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .contract import INPUTS, MODEL_NAME, OUTPUT
from .dtypes import TRITON_TYPES
from .sizes import TEXT_TOKENS
from .specs import NetworkSpec, Tensor
from .stages import ENSEMBLE_STAGES

ENSEMBLE = MODEL_NAME

# CONTRACT.md section 3 (stated in contract.py): the ensemble's inputs, with whether Triton may let
# each through absent, and its output.
API_INPUTS = tuple((Tensor(t.name, t.dtype, t.shape), t.optional) for t in INPUTS)
API_OUTPUT = Tensor(OUTPUT.name, OUTPUT.dtype, OUTPUT.shape)

# What preprocess hands the sampler besides the text encoder's inputs: one request, validated, defaults
# applied, the guidance decision made (`guided`; under guidance the sampler also needs the empty negative
# prompt's tokens). The sampler batches requests (Triton's dynamic batcher), and a batching model's tensors
# carry the batch as their first dimension: shapes here are the sampler's, preprocess adds a leading 1.
SAMPLER_INPUTS = (
    Tensor("height", "int32", (1,)),
    Tensor("width", "int32", (1,)),
    Tensor("seed", "int64", (1,)),
    Tensor("num_inference_steps", "int32", (1,)),
    Tensor("guidance_scale", "float32", (1,)),
    Tensor("guided", "bool", (1,)),
    Tensor("reference_pixels", "uint8", ("bytes",)),
    Tensor("reference_shapes", "int32", ("n", 2)),
    Tensor("negative_input_ids", "int64", (TEXT_TOKENS,)),
    Tensor("negative_attention_mask", "int64", (TEXT_TOKENS,)),
    # Inpainting / image-to-image (sampler_io.py): the picture at the output size (no bytes without one), its
    # per-token mask (none: all repainted) and the strength that cuts the schedule.
    Tensor("image_pixels", "uint8", ("bytes",)),
    Tensor("mask_tokens", "float32", ("tokens",)),
    Tensor("strength", "float32", (1,)),
    # The request's LoRAs in lora_library's wire form ("" for none): part of the batch's Shape, and passed on
    # to the DiT with each call.
    Tensor("loras", "bytes", (1,)),
)
# References differ in size from request to request: the batcher may still put them in one execute()
# (the sampler groups by shape itself).
RAGGED = ("reference_pixels", "reference_shapes", "image_pixels", "mask_tokens")
# What preprocess hands the postprocess model (padding_mask_crop, flux2_klein/mask_crop.py): the box inpainted
# and what is kept of the picture (RGBA); without a crop an empty overlay, and the image passes unchanged.
POSTPROCESS_MODEL = "postprocess"
POSTPROCESS_INPUTS = (Tensor("crop_box", "int32", (4,)), Tensor("overlay", "uint8", ("height", "width", 4)))
# preprocess's word to the guardrail's output check (the safety model, when the repository has one).
CHECK_OUTPUT = Tensor("check_output", "bool", (1,))
SAFETY_MODEL = "safety"
# The torch DiT's one input beyond its spec's, in a repository with a LoRA library: the set the call runs with
# (lora_library.py's wire form; absent: none). ONNX graphs and engines have no such input.
LORA_INPUT = Tensor("loras", "bytes", (1,))
# The network that takes the sampler's output; its input gets the batch dimension back (see leaf_inputs).
SAMPLER_CONSUMER = "vae_decoder"


# The big float tensors between models that compute in bf16: the prompt embedding (text encoder -> sampler ->
# DiT, 512 x 7680 values, also what the response cache copies to the host) and the DiT's token states. They
# cross in bf16 when the leaves compute in bf16 anyway; the Euler steps stay float32 in the sampler, and the
# CPU parity path (fp32 leaves) keeps every boundary float32.
BF16_BOUNDARY = {"text_encoder": ("prompt_embeds",),
                 "transformer": ("hidden_states", "encoder_hidden_states", "velocity")}


def with_boundary(specs: dict[str, NetworkSpec], dtype: str) -> dict[str, NetworkSpec]:
    """`specs` with BF16_BOUNDARY's tensors in `dtype` ("float32" leaves them as they are)."""
    if dtype == "float32":
        return specs

    def retype(spec: NetworkSpec, tensors):
        names = BF16_BOUNDARY.get(spec.name, ())
        return tuple(dataclasses.replace(t, dtype=dtype) if t.name in names else t for t in tensors)

    return {name: dataclasses.replace(spec, inputs=retype(spec, spec.inputs), outputs=retype(spec, spec.outputs))
            for name, spec in specs.items()}


@dataclass(frozen=True)
class Batching:
    """How the sampler batches concurrent requests (Triton's dynamic batcher on the sampler model).

    max_requests: requests per denoising loop (each takes 1 DiT row, 2 under guidance); max_dit_rows: the
    DiT's batch limit (a TensorRT engine's profile maximum; PyTorch and ONNX Runtime take any);
    queue_delay_us: how long a request may wait for others before its loop starts (0: it only joins
    requests already queued, so one client alone never waits).
    """

    max_requests: int = 4
    max_dit_rows: int = 8
    queue_delay_us: int = 0

    def __post_init__(self):
        if self.max_requests < 1 or self.max_dit_rows < 1 or self.queue_delay_us < 0:
            raise ValueError(f"batching: max_requests and max_dit_rows must be >= 1 and queue_delay_us >= 0, "
                             f"got {self}")


@dataclass(frozen=True)
class Instances:
    """How many copies of each model serve at once, and where.

    The CPU defaults were chosen by measurement (tiny checkpoint, 2-core host, concurrency 2, A B A B in one
    session; bench/results/2026-12-03-cpu-ort-leaves-without-torch.md): one VAE decoder or one DiT instance
    instead of two cost 6-15% of images/s (a 180-200 ms queue in front of it); a second text encoder took its
    3-8 ms queue away but moved images/s by +1.5%, inside the run-to-run spread, for one more copy of its
    weights (16 GB in fp32 for the real Qwen3-4B): kept at one.
    """

    kind: str = "KIND_CPU"  # KIND_GPU on a GPU machine
    preprocess: int = 2
    text_encoder: int = 1
    sampler: int = 4  # a sampler mostly waits on its DiT calls: more of them keep the DiT busy
    transformer: int = 2
    vae_decoder: int = 2
    vae_encoder: int = 1


def _dims(t: Tensor) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in t.shape) + " ]"


def _tensor(t: Tensor, optional: bool = False, ragged: bool = False, reshape: tuple | None = None) -> str:
    extra = " optional: true" if optional else ""
    extra += " allow_ragged_batch: true" if ragged else ""
    if reshape is not None:
        extra += f" reshape: {{ shape: {_dims(Tensor(t.name, t.dtype, reshape))} }}"
    return f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} dims: {_dims(t)}{extra} }}'


def _io(kind: str, tensors, optional: tuple[str, ...] = (), ragged: tuple[str, ...] = ()) -> str:
    body = ",\n".join(_tensor(t, t.name in optional, t.name in ragged) for t in tensors)
    return f"{kind} [\n{body}\n]"


def _with_batch(t: Tensor) -> Tensor:
    return Tensor(t.name, t.dtype, (1, *t.shape))


def leaf_inputs(spec: NetworkSpec, optional_inputs: tuple[Tensor, ...] = ()) -> str:
    """A leaf's input block, with `optional_inputs` after the spec's (LORA_INPUT). The sampler's consumer
    receives the sampler's output with its batch dimension (a leading 1): Triton's `reshape` drops it before
    the network, whose tensors stay the spec's."""
    if spec.name != SAMPLER_CONSUMER:
        return _io("input", (*spec.inputs, *optional_inputs), tuple(t.name for t in optional_inputs))
    body = ",\n".join(_tensor(_with_batch(t), reshape=t.shape) for t in spec.inputs)
    return f"input [\n{body}\n]"


def _params(params: dict[str, str]) -> str:
    return "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(str(v))} }} }}' for k, v in params.items()
    )


def _instances(count: int, kind: str) -> str:
    return f"instance_group [ {{ count: {count} kind: {kind} }} ]"


def python_model(name: str, inputs, outputs, *, instances: int, kind: str, optional=(), params=None,
                 extra: str = "", input_block: str | None = None, max_batch_size: int = 0,
                 ragged: tuple[str, ...] = ()) -> str:
    params = dict(params or {})
    if kind == "KIND_GPU":
        # Let GPU tensors reach the model as GPU tensors (DLPack), instead of being copied to the host.
        params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    parts = [
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch_size}",
        input_block or _io("input", inputs, optional, ragged), _io("output", outputs), _instances(instances, kind),
        _params(params), extra,
    ]
    return "\n".join(p for p in parts if p) + "\n"


def leaf_config(spec: NetworkSpec, instances: Instances, params: dict[str, str],
                optional_inputs: tuple[Tensor, ...] = ()) -> str:
    # Only the text encoder's answer depends on nothing but its inputs and is worth remembering: a
    # repeated prompt skips it. (Every model is deterministic, but the others' inputs rarely repeat.)
    cache = "response_cache { enable: true }" if spec.name == "text_encoder" else ""
    return python_model(spec.name, spec.inputs, spec.outputs, instances=getattr(instances, spec.name),
                        kind=instances.kind, params=params, extra=cache,
                        input_block=leaf_inputs(spec, optional_inputs))


def preprocess_config(text_encoder: NetworkSpec, instances: Instances, params: dict[str, str]) -> str:
    inputs = [t for t, _ in API_INPUTS]
    optional = tuple(t.name for t, opt in API_INPUTS if opt)
    # Host work (tokenizing, decoding images) whatever the leaves run on.
    outputs = (list(text_encoder.inputs) + [_with_batch(t) for t in SAMPLER_INPUTS] + list(POSTPROCESS_INPUTS)
               + [CHECK_OUTPUT])
    return python_model("preprocess", inputs, outputs,
                        instances=instances.preprocess, kind="KIND_CPU", optional=optional, params=params)


def postprocess_config(vae_decoder: NetworkSpec, instances: Instances) -> str:
    """The decoded image's last step: pasted back into the picture for a padding_mask_crop request, else
    answered as it is. Host work (Pillow), as many instances as preprocess."""
    (image,) = vae_decoder.outputs
    return python_model(POSTPROCESS_MODEL, (image, *POSTPROCESS_INPUTS), (image,),
                        instances=instances.preprocess, kind="KIND_CPU")


def sampler_config(text_encoder: NetworkSpec, vae_decoder: NetworkSpec, instances: Instances,
                   batching: Batching, params: dict[str, str]) -> str:
    """The sampler: a batching model. Its inputs are one request's each (the text encoder's batch-1
    output is a batch of one here); its output, the latents, goes to the VAE decoder with the batch
    dimension (see leaf_inputs)."""
    (embeds,) = text_encoder.outputs
    inputs = [Tensor(embeds.name, embeds.dtype, embeds.shape[1:]), *SAMPLER_INPUTS]
    params = {**params, "max_dit_rows": str(batching.max_dit_rows)}
    delay = f"dynamic_batching {{ max_queue_delay_microseconds: {batching.queue_delay_us} }}"
    return python_model("sampler", inputs, vae_decoder.inputs, instances=instances.sampler,
                        kind=instances.kind, params=params, max_batch_size=batching.max_requests,
                        ragged=RAGGED, extra=delay)


def ensemble_config(specs: dict[str, NetworkSpec], safety: bool = False, postprocess: bool = False) -> str:
    """preprocess -> text_encoder -> sampler -> vae_decoder, with `postprocess` padding_mask_crop's paste
    back after it, and with `safety` the guardrail's output-image check (flux2_klein/guardrail) last."""
    te, dec = specs["text_encoder"], specs["vae_decoder"]
    # preprocess's check_output reaches the ensemble only when a safety step reads it (an unused ensemble
    # tensor fails the model's load).
    internal = {t.name: f"request_{t.name}" for t in (*SAMPLER_INPUTS, *(POSTPROCESS_INPUTS if postprocess else ()),
                                                       *((CHECK_OUTPUT,) if safety else ()))}
    (decoded,) = dec.outputs
    built = {POSTPROCESS_MODEL: postprocess}  # stages.OPTIONAL_STAGES: in the ensemble only when built
    stages = [s for s in ENSEMBLE_STAGES if built.get(s, True)]
    # The image's name after each stage that makes one: the last answers the ensemble's `image`.
    after = {"vae_decoder": "decoded_image", POSTPROCESS_MODEL: "final_image"}
    if not safety:
        after[stages[-1]] = API_OUTPUT.name

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
        outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
        return f'  {{ model_name: "{model}" model_version: -1\n    {ins}\n    {outs} }}'

    # Each stage's tensors; the order is stages.ENSEMBLE_STAGES', stated there once.
    wiring = {
        "preprocess": ({t.name: t.name for t, _ in API_INPUTS}, {**{t.name: t.name for t in te.inputs}, **internal}),
        "text_encoder": ({t.name: t.name for t in te.inputs}, {t.name: t.name for t in te.outputs}),
        "sampler": ({**{t.name: t.name for t in te.outputs}, **{t.name: internal[t.name] for t in SAMPLER_INPUTS}},
                    {t.name: t.name for t in dec.inputs}),
        "vae_decoder": ({t.name: t.name for t in dec.inputs}, {decoded.name: after["vae_decoder"]}),
        POSTPROCESS_MODEL: ({decoded.name: "decoded_image",
                             **{t.name: internal.get(t.name) for t in POSTPROCESS_INPUTS}},  # used only if built
                            {decoded.name: after[POSTPROCESS_MODEL]}),
    }
    steps = [step(name, *wiring[name]) for name in stages]
    if safety:
        steps.append(step(SAFETY_MODEL, {"image": after[stages[-1]], CHECK_OUTPUT.name: internal[CHECK_OUTPUT.name]},
                          {"image": API_OUTPUT.name}))
    optional = tuple(t.name for t, opt in API_INPUTS if opt)
    return "\n".join([
        f'name: "{ENSEMBLE}"', 'platform: "ensemble"', "max_batch_size: 0",
        _io("input", [t for t, _ in API_INPUTS], optional), _io("output", [API_OUTPUT]),
        "ensemble_scheduling {\n step [\n" + ",\n".join(steps) + "\n ]\n}",
    ]) + "\n"



def plan_config(spec: NetworkSpec, instances: Instances) -> str:
    """A leaf network as a `tensorrt_plan` model: every profile usable by each instance (the backend picks
    the one that fits a request's shapes).

    No CUDA graphs. tensorrt_backend captures the graphs of a `max_batch_size: 0` model under batch key 0
    (src/instance_state.cc, InitializeCudaGraph: `cuda_graph_batch_sizes = {0}`) but looks them up with the
    request's total batch size, which is 1 for such models (Run: `input_dims{total_batch_size_}`, then
    FindClosestCudaGraph), so a captured graph is never launched (triton-inference-server/server#7150; read
    at tensorrt_backend e2ef6d7, the fix is tensorrt_backend PR #125, after Triton 25.10). Capture would
    still cost memory and load time, and a profile lacking the graph's shape (the VAE encoder's aspect
    buckets) logs an ERROR at load. Our networks run tens of milliseconds a call at 1 MP, where a graph's
    saved launch overhead is a fraction of a percent: nothing to win even where graphs work."""
    profiles = ", ".join(f'"{i}"' for i in range(len(spec.profiles)))
    count = getattr(instances, spec.name)
    parts = [
        f'name: "{spec.name}"', 'platform: "tensorrt_plan"', "max_batch_size: 0",
        'default_model_filename: "model.plan"',
        leaf_inputs(spec), _io("output", spec.outputs),
        f"instance_group [ {{ count: {count} kind: KIND_GPU profile: [ {profiles} ] }} ]",
        # Each profile gets an execution context; by default each would hold memory for the largest shape
        # of all profiles (the DiT's multi-reference maximum, three times over). Allocate on a profile change.
        _params({"execution_context_allocation_strategy": "ON_PROFILE_CHANGE"}),
    ]
    if spec.name == "text_encoder":
        parts.append("response_cache { enable: true }")
    return "\n".join(parts) + "\n"


# One GPU: one engine copy per network (each instance holds its weights), several samplers so that
# requests overlap on the host while the GPU works.
GPU_INSTANCES = Instances(kind="KIND_GPU", preprocess=4, text_encoder=1, sampler=2, transformer=1,
                          vae_decoder=1, vae_encoder=1)
