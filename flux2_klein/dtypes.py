"""Every name a tensor dtype goes by in this project, in one table.

The specs (specs.py) and the contract name dtypes as numpy does ("float32", "int64", "bool"), plus
"bfloat16" (no numpy dtype) and "bytes" (Triton's BYTES, numpy object arrays). From that name follow
KServe's datatype (what a request carries and Triton's Python backend reports), the type in a Triton
config.pbtxt, and torch's dtype; the compute precisions (`--dtype fp32|bf16|fp16`) are names for three of
them. Nothing here imports numpy or torch (torch is imported when a torch dtype is asked for), so the
client, the container and the configs read it as freely as the leaves do.
"""

from __future__ import annotations

# dtype name -> KServe's datatype.
DATATYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
    "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "bfloat16": "BF16", "float32": "FP32", "float64": "FP64", "bytes": "BYTES",
}
# dtype name -> Triton's config type: KServe's name after TYPE_, but BYTES is TYPE_STRING there.
TRITON_TYPES = {name: "TYPE_STRING" if kserve == "BYTES" else f"TYPE_{kserve}" for name, kserve in DATATYPES.items()}
# Triton's config type -> dtype name (TYPE_BF16 -> bfloat16): what a model reads back from its config.
CONFIG_DTYPES = {triton: name for name, triton in TRITON_TYPES.items()}
# The precisions a network computes in (`--dtype`; the torch leaves' and the exporter's `dtype`).
COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The compute precision the torch leaves (and the bench's diffusers baseline) take by default on each
# device: bf16 on a GPU; fp32 on a CPU, the parity path.
DEVICE_DTYPES = {"gpu": "bf16", "cpu": "fp32"}


def torch_dtype(name: str):
    """torch's dtype for a dtype name ("bfloat16") or a compute precision ("bf16")."""
    name = COMPUTE_DTYPES.get(name, name)
    if name not in DATATYPES or name == "bytes":
        allowed = [*COMPUTE_DTYPES, *(n for n in DATATYPES if n != "bytes")]
        raise ValueError(f"dtype: {name!r} has no torch dtype; allowed: {', '.join(allowed)}")
    import torch

    return getattr(torch, name)
