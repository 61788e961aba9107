"""Moving tensors in and out of Triton's Python backend without extra copies, on the CPU or the GPU.

A torch tensor goes through DLPack, which keeps a GPU tensor on the GPU between models. A numpy array (CPU
only: ONNX Runtime's outputs, preprocess's) is handed to `pb_utils.Tensor(name, array)`, which keeps a
reference to the array and reads its buffer as the DLPack path does; that constructor is right for the
numpy 1.x this package pins (pyproject.toml: the Triton 2.51 stub is built for numpy 1). Not numpy's own
`__dlpack__`: the stub renames a consumed capsule "used_dlpack" (python_backend src/pb_tensor.cc,
FromDLPackCapsule), not DLPack's "used_dltensor", so numpy's capsule destructor fails and the stub dies.

torch is imported only by the functions that hand out torch tensors (`from_triton`, `get_input`, `bls`), and
by `to_triton` when given one: an ONNX Runtime leaf's stub never loads it, which keeps ~210 MB of torch's
libraries out of each such instance (bench/results/2026-12-03-cpu-ort-leaves-without-torch.md).
Only importable inside a Triton Python-backend stub (it needs triton_python_backend_utils).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import triton_python_backend_utils as pb_utils

if TYPE_CHECKING:
    import torch


def to_triton(name: str, value) -> "pb_utils.Tensor":
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, value if value.dtype == np.object_ else np.ascontiguousarray(value))
    return _torch_to_triton(name, value)


def _torch_to_triton(name: str, value: "torch.Tensor") -> "pb_utils.Tensor":
    import torch
    from torch.utils.dlpack import to_dlpack

    value = value.contiguous()
    if not _c_order(value):
        # torch calls a tensor contiguous whatever the strides of its size-1 and size-0 dimensions (a view
        # like `x[None]`, an empty reference list); Triton checks every stride but the first.
        value = value.clone(memory_format=torch.contiguous_format)
    if value.is_cuda:
        # A DLPack capsule hands over the memory, not the stream: the kernels writing it must be done
        # before another process (Triton, the next model) reads it.
        torch.cuda.current_stream(value.device).synchronize()
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value))


def _c_order(value: "torch.Tensor") -> bool:
    expected = 1
    for size, stride in zip(reversed(value.shape[1:]), reversed(value.stride()[1:])):
        if stride != expected:
            return False
        expected *= size
    return True


def from_triton(tensor: "pb_utils.Tensor") -> "torch.Tensor":
    """A torch view of a numeric Triton tensor, on whichever device Triton placed it."""
    from torch.utils.dlpack import from_dlpack

    return from_dlpack(tensor.to_dlpack())


def get_input(request, name: str) -> "torch.Tensor | None":
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else from_triton(t)


def get_numpy(request, name: str) -> np.ndarray | None:
    """A request input as numpy (CPU): for validation, BYTES, and small host-side values."""
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    return t.as_numpy() if t.is_cpu() else from_triton(t).cpu().numpy()


def params(model_config: dict) -> dict[str, str]:
    return {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()}


def error_response(message: str, invalid_argument: bool = False) -> "pb_utils.InferenceResponse":
    code = pb_utils.TritonError.INVALID_ARG if invalid_argument else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def bls(model: str, inputs: dict, outputs: list[str], device: str = "cpu") -> "list[torch.Tensor]":
    """Call another model of the repository (Business Logic Scripting); outputs land on `device`."""
    kwargs = {}
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, index)
    request = pb_utils.InferenceRequest(
        model_name=model, inputs=[to_triton(k, v) for k, v in inputs.items()],
        requested_output_names=outputs, **kwargs,
    )
    response = request.exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return [from_triton(pb_utils.get_output_tensor_by_name(response, n)) for n in outputs]
