"""`flux2-klein serve`: run Triton Inference Server on a repository, in the foreground.

Uses the container's own `tritonserver` where there is one (NGC images: /opt/tritonserver), else the
build bundled in the nvidia-pytriton wheel, whose Python backend needs its stub for this interpreter
put beside it: that is assembled once in a cache folder, never inside site-packages.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# Shared memory between Triton and each Python model (one region per instance, in /dev/shm, which
# counts as memory): tensors here are megabytes (a 1 MP image, a prompt embedding of 512 x 7680
# floats), so start at 16 MB rather than 1 MB and grow in 16 MB steps.
SHM_BYTES = 16 << 20
RESPONSE_CACHE_BYTES = 256 << 20  # about 16 distinct prompts' embeddings at the real width


@dataclass
class TritonInstall:
    binary: Path
    backend_dir: Path | None = None
    cache_dir: Path | None = None  # where the response cache's library lies
    env: dict[str, str] = field(default_factory=dict)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flux2-klein"


def find_tritonserver() -> TritonInstall:
    explicit = os.environ.get("TRITONSERVER")
    for candidate in filter(None, [explicit, shutil.which("tritonserver"), "/opt/tritonserver/bin/tritonserver"]):
        if Path(candidate).is_file():
            return TritonInstall(Path(candidate))
    try:
        import pytriton
    except ImportError:
        raise FileNotFoundError(
            "tritonserver: not found on PATH, in /opt/tritonserver, or in the nvidia-pytriton wheel; "
            "set TRITONSERVER to its path"
        ) from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"tritonserver: the bundled Python backend has no stub for Python {version}")
    backends = _cache_dir() / f"backends-{version}"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    # Links, not copies: the stub finds its CUDA runtime relative to its real location.
    for src in (dist / "backends" / "python" / "libtriton_python.so",
                dist / "backends" / "python" / "triton_python_backend_utils.py", stub):
        link = python / src.name
        if not (link.is_symlink() and os.readlink(link) == str(src)):
            link.unlink(missing_ok=True)
            link.symlink_to(src)
    libs = dist.parent.parent / "nvidia_pytriton.libs"
    env = {
        "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [os.environ.get("LD_LIBRARY_PATH"), str(libs)])),
        # The stub embeds CPython and takes its packages from the first python on PATH: ours.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    return TritonInstall(dist / "bin" / "tritonserver", backends, dist / "caches", env)


def server_command(install: TritonInstall, repository: Path, http_port: int, grpc_port: int,
                   metrics_port: int, extra: tuple[str, ...] = ()) -> list[str]:
    cmd = [
        str(install.binary), f"--model-repository={repository}",
        f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
        f"--cache-config=local,size={RESPONSE_CACHE_BYTES}",
        f"--backend-config=python,shm-default-byte-size={SHM_BYTES}",
        f"--backend-config=python,shm-growth-byte-size={SHM_BYTES}",
        "--exit-on-error=true", "--strict-readiness=true", "--log-info=true",
    ]
    if install.backend_dir is not None:
        cmd.append(f"--backend-directory={install.backend_dir}")
    if install.cache_dir is not None:
        cmd.append(f"--cache-directory={install.cache_dir}")
    return cmd + list(extra)


def wait_ready(http_port: int, process: subprocess.Popen | None = None, timeout_s: float = 300) -> bool:
    """Poll /v2/health/ready until 200; False if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{http_port}/v2/health/ready"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    return False


def serve(repository: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
          extra: tuple[str, ...] = ()) -> int:
    """Run tritonserver until it exits or we are told to stop; its exit status is ours."""
    repository = Path(repository).resolve()
    if not (repository / "flux2_klein" / "config.pbtxt").is_file():
        raise FileNotFoundError(f"repository: {repository} has no flux2_klein/config.pbtxt; "
                                "run `flux2-klein build` first")
    install = find_tritonserver()
    env = {**os.environ, **install.env}
    process = subprocess.Popen(server_command(install, repository, http_port, grpc_port, metrics_port, extra),
                               env=env)

    def stop(signum, _frame):
        # Triton finishes the requests in flight on SIGTERM, then exits.
        process.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = process.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if process.poll() is None:
            process.kill()
    return code
