"""Triton model configs (config.pbtxt text) generated from the network specs and the API's tensors.

Nothing here is hand-copied from a spec: the leaf models' tensors are the ONNX graphs' tensors, and
the ensemble wires them by name. Output is protobuf text format, which Triton reads directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .specs import NetworkSpec, Tensor

TRITON_TYPES = {
    "float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "uint8": "TYPE_UINT8",
    "bytes": "TYPE_STRING", "bfloat16": "TYPE_BF16", "float16": "TYPE_FP16",
}

ENSEMBLE = "flux2_klein"

# CONTRACT.md section 3: the ensemble's inputs (and which Triton may let through absent) and its output.
# `prompt` is required, but declared optional: Triton does not check an ensemble's required inputs, and a
# request without one would stall the ensemble ("unexpected deadlock"); preprocess rejects it by name.
API_INPUTS = (
    (Tensor("prompt", "bytes", (1,)), True),
    (Tensor("height", "int32", (1,)), True),
    (Tensor("width", "int32", (1,)), True),
    (Tensor("seed", "int64", (1,)), True),
    (Tensor("num_inference_steps", "int32", (1,)), True),
    (Tensor("guidance_scale", "float32", (1,)), True),
    (Tensor("reference_images", "bytes", ("n",)), True),
)
API_OUTPUT = Tensor("image", "uint8", ("height", "width", 3))

# What preprocess hands on, validated and with defaults applied, besides the text encoder's inputs.
REQUEST_PARAMS = (
    Tensor("height", "int32", (1,)),
    Tensor("width", "int32", (1,)),
    Tensor("seed", "int64", (1,)),
    Tensor("num_inference_steps", "int32", (1,)),
    Tensor("guidance_scale", "float32", (1,)),
    Tensor("reference_pixels", "uint8", ("bytes",)),
    Tensor("reference_shapes", "int32", ("n", 2)),
)


@dataclass(frozen=True)
class Instances:
    """How many copies of each model serve at once, and where."""

    kind: str = "KIND_CPU"  # KIND_GPU on a GPU machine
    preprocess: int = 2
    text_encoder: int = 1
    sampler: int = 4  # a sampler mostly waits on its DiT calls: more of them keep the DiT busy
    transformer: int = 2
    vae_decoder: int = 2
    vae_encoder: int = 1


def _dims(t: Tensor) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in t.shape) + " ]"


def _tensor(t: Tensor, optional: bool = False) -> str:
    opt = " optional: true" if optional else ""
    return f'  {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} dims: {_dims(t)}{opt} }}'


def _io(kind: str, tensors, optional: tuple[str, ...] = ()) -> str:
    body = ",\n".join(_tensor(t, t.name in optional) for t in tensors)
    return f"{kind} [\n{body}\n]"


def _params(params: dict[str, str]) -> str:
    return "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(str(v))} }} }}' for k, v in params.items()
    )


def _instances(count: int, kind: str) -> str:
    return f"instance_group [ {{ count: {count} kind: {kind} }} ]"


def python_model(name: str, inputs, outputs, *, instances: int, kind: str, optional=(), params=None,
                 extra: str = "") -> str:
    params = dict(params or {})
    if kind == "KIND_GPU":
        # Let GPU tensors reach the model as GPU tensors (DLPack), instead of being copied to the host.
        params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    parts = [
        f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
        _io("input", inputs, optional), _io("output", outputs), _instances(instances, kind),
        _params(params), extra,
    ]
    return "\n".join(p for p in parts if p) + "\n"


def leaf_config(spec: NetworkSpec, instances: Instances, params: dict[str, str]) -> str:
    # Only the text encoder's answer depends on nothing but its inputs and is worth remembering: a
    # repeated prompt skips it. (Every model is deterministic, but the others' inputs rarely repeat.)
    cache = "response_cache { enable: true }" if spec.name == "text_encoder" else ""
    return python_model(spec.name, spec.inputs, spec.outputs, instances=getattr(instances, spec.name),
                        kind=instances.kind, params=params, extra=cache)


def preprocess_config(text_encoder: NetworkSpec, instances: Instances, params: dict[str, str]) -> str:
    inputs = [t for t, _ in API_INPUTS]
    optional = tuple(t.name for t, opt in API_INPUTS if opt)
    # Host work (tokenizing, decoding images) whatever the leaves run on.
    return python_model("preprocess", inputs, list(text_encoder.inputs) + list(REQUEST_PARAMS),
                        instances=instances.preprocess, kind="KIND_CPU", optional=optional, params=params)


def sampler_config(text_encoder: NetworkSpec, vae_decoder: NetworkSpec, instances: Instances,
                   params: dict[str, str]) -> str:
    inputs = list(text_encoder.outputs) + list(REQUEST_PARAMS)
    return python_model("sampler", inputs, vae_decoder.inputs, instances=instances.sampler,
                        kind=instances.kind, params=params)


def ensemble_config(specs: dict[str, NetworkSpec]) -> str:
    te, dec = specs["text_encoder"], specs["vae_decoder"]
    internal = {t.name: f"request_{t.name}" for t in REQUEST_PARAMS}

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        ins = " ".join(f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
        outs = " ".join(f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
        return f'  {{ model_name: "{model}" model_version: -1\n    {ins}\n    {outs} }}'

    steps = [
        step("preprocess", {t.name: t.name for t, _ in API_INPUTS},
             {**{t.name: t.name for t in te.inputs}, **internal}),
        step("text_encoder", {t.name: t.name for t in te.inputs}, {t.name: t.name for t in te.outputs}),
        step("sampler", {**{t.name: t.name for t in te.outputs}, **internal},
             {t.name: t.name for t in dec.inputs}),
        step("vae_decoder", {t.name: t.name for t in dec.inputs}, {dec.outputs[0].name: API_OUTPUT.name}),
    ]
    optional = tuple(t.name for t, opt in API_INPUTS if opt)
    return "\n".join([
        f'name: "{ENSEMBLE}"', 'platform: "ensemble"', "max_batch_size: 0",
        _io("input", [t for t, _ in API_INPUTS], optional), _io("output", [API_OUTPUT]),
        "ensemble_scheduling {\n step [\n" + ",\n".join(steps) + "\n ]\n}",
    ]) + "\n"



def plan_config(spec: NetworkSpec, instances: Instances) -> str:
    """A leaf network as a `tensorrt_plan` model: every profile usable by each instance (the backend picks
    the one that fits a request's shapes), CUDA graphs captured for the opt shapes (the common case:
    other shapes run without a graph)."""
    profiles = ", ".join(f'"{i}"' for i in range(len(spec.profiles)))
    count = getattr(instances, spec.name)
    opt = {k: v[1] for k, v in spec.profiles[0].dims.items()}
    graph_inputs = " ".join(
        f'input {{ key: "{t.name}" value {{ dim: [ {", ".join(str(d) for d in spec.shape(t, opt))} ] }} }}'
        for t in spec.inputs)
    parts = [
        f'name: "{spec.name}"', 'platform: "tensorrt_plan"', "max_batch_size: 0",
        'default_model_filename: "model.plan"',
        _io("input", spec.inputs), _io("output", spec.outputs),
        f"instance_group [ {{ count: {count} kind: KIND_GPU profile: [ {profiles} ] }} ]",
        f"optimization {{ cuda {{ graphs: true graph_spec [ {{ {graph_inputs} }} ] }} }}",
    ]
    if spec.name == "text_encoder":
        parts.append("response_cache { enable: true }")
    return "\n".join(parts) + "\n"


# One GPU: one engine copy per network (each instance holds its weights), several samplers so that
# requests overlap on the host while the GPU works.
GPU_INSTANCES = Instances(kind="KIND_GPU", preprocess=4, text_encoder=1, sampler=4, transformer=1,
                          vae_decoder=1, vae_encoder=1)
