"""Shared fixtures: one tiny checkpoint of each kind per test session, made once and reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Two CPU cores in CI: let torch and ONNX Runtime use both without oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A distilled (4-step) tiny checkpoint."""
    from flux2_klein.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, distilled=True)


@pytest.fixture(scope="session")
def tiny_base_ckpt(tmp_path_factory) -> Path:
    """An undistilled ("base") tiny checkpoint: classifier-free guidance with an empty negative prompt."""
    from flux2_klein.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("ckpt") / "tiny-base", seed=1, distilled=False)


@pytest.fixture(scope="session")
def tiny_pipe(tiny_ckpt):
    """diffusers' own pipeline on the tiny checkpoint: the oracle."""
    import torch
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_ckpt, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def onnx_dir(tiny_ckpt, tmp_path_factory) -> Path:
    """All four networks of the tiny checkpoint exported to ONNX (fp32), once per session."""
    from flux2_klein.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny_ckpt, out, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def ort_session():
    """ONNX Runtime sessions, one per graph path, shared by every test."""
    import onnxruntime as ort

    cache = {}

    def get(path):
        path = str(path)
        if path not in cache:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 2
            cache[path] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        return cache[path]

    return get


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """`flux2-klein serve` in a subprocess: the real command, the real tritonserver."""

    def __init__(self, repo: Path, log_path: Path):
        import subprocess
        import sys

        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flux2_klein.cli", "serve", "--repository", str(repo),
             "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
             "--metrics-port", str(self.metrics_port)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url

    def wait_ready(self, timeout_s: float = 600) -> None:
        from flux2_klein.server import wait_ready

        if not wait_ready(self.http_port, self.process, timeout_s):
            self.stop()
            raise RuntimeError(f"tritonserver did not become ready:\n{self.log_path.read_text()[-5000:]}")

    @classmethod
    def start(cls, repo: Path, log_dir: Path, timeout_s: float = 600) -> "RunningServer":
        """Start and wait until ready. Triton's Python backend now and then aborts while many stubs start
        on a loaded machine (boost::interprocess::lock_exception, a known Triton issue): that failure,
        and only that one, earns a second start."""
        for attempt in (1, 2):
            server = cls(repo, Path(log_dir) / f"tritonserver-{attempt}.log")
            try:
                server.wait_ready(timeout_s)
                return server
            except RuntimeError:
                if attempt == 2 or "lock_exception" not in server.log_path.read_text(errors="replace"):
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except Exception:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def triton_repo(tiny_ckpt, onnx_dir, tmp_path_factory) -> Path:
    from flux2_klein.repository import build_repository

    return build_repository(tiny_ckpt, tmp_path_factory.mktemp("repo") / "repo", onnx_dir=onnx_dir)


@pytest.fixture(scope="session")
def triton_server(triton_repo, tmp_path_factory):
    server = RunningServer.start(triton_repo, tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()
