"""Memory per model instance of a Triton serving a repository on this machine (Linux /proc).

Each Python-backend model instance is its own stub process, started by tritonserver as
`triton_python_backend_stub REPO/MODEL/VERSION/model.py SHM_REGION ... INSTANCE_NAME ...` (python_backend
src/stub_launcher.cc, StubLauncher::Launch: the model path first, the instance's name eighth): the model
file's path says which repository and model it serves. Its peak resident set (VmHWM) is what that instance
has needed so far, its current one (VmRSS) what it holds between requests.
A `tensorrt_plan` model runs inside tritonserver itself and has no process of its own: not listed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flux2_klein.watchdog import repository_stubs

# A library only torch brings: whether an instance's process has torch loaded (~210 MB resident).
TORCH_LIBRARY = "libtorch_cpu.so"


def _kb(status: str, key: str) -> int:
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def instance_memory(repository: Path | str) -> dict[str, dict[str, Any]]:
    """{instance name: {model, pid, peak_mb, rss_mb, torch}} for the stubs serving `repository`'s models on
    this machine; {} where there are none (another machine's server, a tensorrt_plan repository, no /proc)."""
    out: dict[str, dict[str, Any]] = {}
    if not Path("/proc").is_dir():
        return out
    for pid, argv in repository_stubs(Path(repository)):
        if len(argv) < 9:
            continue
        model, instance = Path(argv[1]).parent.parent.name, argv[8]
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        out[instance] = {"model": model, "pid": pid, "peak_mb": round(_kb(status, "VmHWM") / 1024, 1),
                         "rss_mb": round(_kb(status, "VmRSS") / 1024, 1), "torch": TORCH_LIBRARY in maps}
    return dict(sorted(out.items()))


def by_model(instances: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: instances, the largest peak and current RSS among them, and whether any has torch."""
    models: dict[str, dict[str, Any]] = {}
    for m in instances.values():
        row = models.setdefault(m["model"], {"instances": 0, "peak_mb": 0.0, "rss_mb": 0.0, "torch": False})
        row["instances"] += 1
        row["peak_mb"] = max(row["peak_mb"], m["peak_mb"])
        row["rss_mb"] = max(row["rss_mb"], m["rss_mb"])
        row["torch"] = row["torch"] or m["torch"]
    return dict(sorted(models.items()))


def own_peak_mb() -> float | None:
    """This process's peak resident set (the direct run's, when it ran here)."""
    try:
        return round(_kb(Path(f"/proc/{os.getpid()}/status").read_text(), "VmHWM") / 1024, 1)
    except OSError:
        return None
