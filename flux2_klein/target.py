"""What a TensorRT engine is specific to (`Target`): the TensorRT that builds it and the GPU it runs on.

One record for the engine builder (export/tensorrt/build.py, which asks torch) and the container's profile key
(which asks nvidia-smi, before anything heavy loads).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger("flux2_klein")


@dataclass(frozen=True)
class Target:
    """The TensorRT and the GPU an engine is built for. Without a GPU: gpu "cpu", compute capability "none";
    without TensorRT: tensorrt "none"."""

    tensorrt: str
    gpu: str
    compute_capability: str


def gpu_facts(nvidia_smi: str | None = "", timeout_s: float = 30) -> tuple[str, str]:
    """(name, compute capability) of the first GPU nvidia-smi lists; ("cpu", "none") without one.

    `nvidia_smi`: "" looks it up on PATH, None means absent, a path uses that program. A container is
    given one GPU, which CUDA's default device then is; nvidia-smi lists only the GPUs it was given.
    """
    exe = shutil.which("nvidia-smi") if nvidia_smi == "" else nvidia_smi
    if not exe:
        return "cpu", "none"
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi failed (%s): treating this machine as having no GPU", e)
        return "cpu", "none"
    line = next((l.strip() for l in out.splitlines() if l.strip()), "")
    name, sep, capability = line.rpartition(",")
    if not sep or not name.strip():
        log.warning("nvidia-smi printed %r, not 'name, compute_cap': treating this machine as having no GPU", line)
        return "cpu", "none"
    return name.strip(), capability.strip()


def tensorrt_version() -> str:
    """The version of the TensorRT module that builds the engines (`tensorrt`, or the bindings wheel's
    `tensorrt_bindings`, as export.tensorrt.library.import_trt finds it); "none" where none imports."""
    from .export.tensorrt.library import import_trt

    try:
        tensorrt = import_trt()
    except Exception:  # absent, or its libraries are: either way no engine can be built here
        return "none"
    return str(getattr(tensorrt, "__version__", "unknown"))



def detect_target() -> Target:
    """This machine, as nvidia-smi and the `tensorrt` module see it; never an error."""
    gpu, capability = gpu_facts()
    return Target(tensorrt=tensorrt_version(), gpu=gpu, compute_capability=capability)
