"""The bench's in-process run of a `--runtime torch` repository: its leaves loaded as the served ones load them.

    from flux2_klein.client.bench.torch_direct import is_torch_repository, torch_sessions

    if is_torch_repository("REPO"):
        sessions, threads, config = torch_sessions("REPO")
        pipe = DirectPipeline("REPO", sessions=sessions)   # with torch.set_num_threads(threads) around it

Each leaf is `torch_runtime.load_leaf` with the arguments model_repository/torch_leaf.py reads from the same
config.pbtxt (checkpoint, dtype, fp8, torch_compile, warm sizes), behind ONNX Runtime's session calls
(`run`, `get_outputs`), which is how DirectPipeline calls its networks. A call runs as the served leaf's does:
inside torch.inference_mode, the inputs in the dtypes the config declares (what Triton lets through), the
outputs cast to the declared boundary dtype, on the CPU. Torch's thread count is one per process in both:
the leaves' `intra_op_threads` (torch_leaf.py sets it in each stub), which the bench sets around its run.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flux2_klein.direct import model_config
from flux2_klein.specs import NETWORKS

def is_torch_repository(repository: str | Path) -> bool:
    """Whether REPO was built with `--runtime torch` (its build.json says so)."""
    manifest = Path(repository) / "build.json"
    return manifest.is_file() and json.loads(manifest.read_text()).get("runtime") == "torch"


class TorchSession:
    """One torch leaf of REPO, called like an ONNX Runtime session (see the module docstring)."""

    def __init__(self, repository: str | Path, name: str):
        import torch
        from google.protobuf.json_format import MessageToDict

        from flux2_klein.torch_runtime import WarmShapes, configure_torch, load_leaf
        from flux2_klein.triton_config import TRITON_TYPES

        config = MessageToDict(model_config(repository, name), preserving_proto_field_name=True)
        kinds = {g.get("kind", "KIND_CPU") for g in config.get("instance_group", [])}
        if kinds - {"KIND_CPU"}:
            raise ValueError(f"direct: {name}'s instances run on {sorted(kinds)}; the torch direct run is "
                             "CPU-only (the GPU bench compares with diffusers: bench/gpu_bench.py)")
        options = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}  # "" is omitted
        spec_dtypes = {triton: spec for spec, triton in TRITON_TYPES.items()}
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.input_dtypes = {t["name"]: spec_dtypes[t["data_type"]] for t in config["input"]}
        boundary = {"TYPE_BF16": torch.bfloat16, "TYPE_FP16": torch.float16}
        self.output_dtypes = [boundary.get(t["data_type"]) for t in config["output"]]
        self.threads = int(options.get("intra_op_threads", "1"))
        configure_torch(options["dtype"])
        self.leaf = load_leaf(options["checkpoint"], name, dtype=options["dtype"], device=torch.device("cpu"),
                              fp8=options.get("fp8", "false") == "true",
                              compile_mode=options.get("torch_compile", ""),
                              warm_shapes=WarmShapes.parse(options.get("warm_sizes", ""),
                                                           int(options.get("max_dit_rows", "1")),
                                                           int(options.get("warm_references", "4"))),
                              input_dtypes=self.input_dtypes)
        self.summary = self.leaf.summary

    def get_outputs(self) -> list[Any]:
        return [SimpleNamespace(name=n) for n in self.outputs]

    def run(self, output_names: list[str], feed: dict[str, Any]) -> list[Any]:
        import torch

        from flux2_klein.dtypes import torch_dtype

        with torch.inference_mode():
            args = [torch.from_numpy(feed[n]).to(torch_dtype(self.input_dtypes[n])) for n in self.inputs]
            result = self.leaf(*args)
            results = result if isinstance(result, tuple) else (result,)
            results = [r if d is None else r.to(d) for r, d in zip(results, self.output_dtypes)]
            # numpy has no bfloat16: widened to float32, which the next leaf narrows back losslessly.
            by_name = {n: (r.float() if r.dtype == torch.bfloat16 else r).numpy()
                       for n, r in zip(self.outputs, results)}
        return [by_name[n] for n in output_names]


def torch_sessions(repository: str | Path) -> tuple[dict[str, TorchSession], int, str]:
    """(sessions by network, the torch threads the leaves run on, what the run used in words)."""
    sessions = {name: TorchSession(repository, name) for name in NETWORKS}
    threads = {s.threads for s in sessions.values()}
    if len(threads) != 1:
        raise ValueError(f"direct: the torch leaves' intra_op_threads differ ({sorted(threads)}); one process "
                         "runs them all on one torch thread count")
    (count,) = threads
    summaries = "; ".join(s.summary for s in sessions.values())
    return sessions, count, (f"torch leaves from `torch_runtime.load_leaf` as model_repository/torch_leaf.py loads "
                             f"them ({summaries}), in torch.inference_mode, {count} torch thread(s) for the leaves "
                             f"and the sampler's math, as each Triton instance sets")
