"""tritonserver and the gateway as the container's two children: started together, watched, stopped together."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..progress import log
from ..server import TritonProcess, answers_200
from .settings import Settings

@dataclass
class Child:
    """One supervised process: what it runs, and where it says it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    ready_url: str | None = None  # polled until it answers 200, to log when the child is ready
    process: subprocess.Popen | None = field(default=None, repr=False)
    ready: bool = False


def server_children(settings: Settings, repository: Path) -> list[Child]:
    """tritonserver on `repository` and the gateway in front of it, with their environments."""
    base = {**os.environ,
            "FLUX2_KLEIN_REPOSITORY": str(repository),
            "FLUX2_KLEIN_TRITON_GRPC_PORT": str(settings.triton_grpc_port),
            "FLUX2_KLEIN_TRITON_HTTP_PORT": str(settings.triton_http_port),
            "FLUX2_KLEIN_TRITON_METRICS_PORT": str(settings.triton_metrics_port)}
    address = settings.triton_address
    triton = TritonProcess(repository, http_port=settings.triton_http_port, grpc_port=settings.triton_grpc_port,
                           metrics_port=settings.triton_metrics_port,
                           extra_args=(f"--http-address={address}", f"--grpc-address={address}"),
                           env={k: v for k, v in base.items() if k != "FLUX2_KLEIN_API_KEY"})
    if settings.triton_command:
        triton_argv, triton_env = list(settings.triton_command), triton.base_env
    else:
        triton_argv, triton_env = triton.command(), triton.environment()
    gateway_argv = list(settings.gateway_command) or [
        sys.executable, "-m", "flux2_klein.cli", "gateway", "--port", str(settings.http_port),
        # 127.0.0.1, not localhost: Triton binds IPv4 and localhost may resolve to ::1 first
        "--triton-url", f"127.0.0.1:{settings.triton_grpc_port}",
    ]
    gateway_env = {**base, "FLUX2_KLEIN_GATEWAY_PORT": str(settings.http_port)}
    if settings.api_key:
        gateway_env["FLUX2_KLEIN_API_KEY"] = settings.api_key
    return [
        Child("tritonserver", triton_argv, triton_env, triton.ready_url),
        Child("gateway", gateway_argv + list(settings.gateway_args), gateway_env,
              f"http://127.0.0.1:{settings.http_port}/v1/health/ready"),
    ]


class Supervisor:
    """Run children until one exits or we are told to stop; then stop the rest.

    Children start in their own sessions: a terminal's Ctrl-C reaches only us, and we forward SIGTERM to
    each child alone (tritonserver then drains its requests and stops its Python-backend stubs itself).
    Whoever has not exited `stop_timeout` seconds later is killed with its whole process group, so no
    stub is left holding GPU memory or shared memory. `reap` (on as PID 1) also collects orphans that
    the kernel re-parents to us, which would otherwise stay zombies.
    """

    def __init__(self, children: list[Child], *, stop_timeout: float = 30.0, poll_s: float = 0.2,
                 reap: bool = False):
        self.children = children
        self.stop_timeout = stop_timeout
        self.poll_s = poll_s
        self.reap = reap
        self._signal: int | None = None

    def _on_signal(self, signum, _frame) -> None:
        self._signal = signum

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for child in self.children:
                log.info("starting %s: %s", child.name, shlex.join(child.argv))
                try:
                    child.process = subprocess.Popen(child.argv, env=child.env, start_new_session=True)
                except OSError as e:
                    log.error("%s: cannot start %s (%s)", child.name, child.argv[0], e)
                    return 1
            return self._watch()
        finally:
            self._stop_all()
            for s, h in previous.items():
                signal.signal(s, h)

    def _watch(self) -> int:
        started = time.monotonic()
        next_probe = started
        while True:
            if self._signal is not None:
                log.info("%s received: stopping %s", signal.Signals(self._signal).name,
                         " and ".join(c.name for c in self.children))
                return 0
            if self.reap:
                self._reap()
            for child in self.children:
                code = child.process.poll()
                if code is not None:
                    log.error("%s exited with status %d; stopping the others", child.name, code)
                    return code if code > 0 else (128 - code if code < 0 else 1)
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + 1.0
                for child in self.children:
                    if child.ready_url and not child.ready and answers_200(child.ready_url, timeout_s=1.0):
                        child.ready = True
                        log.info("%s ready after %.0f s", child.name, time.monotonic() - started)
            time.sleep(self.poll_s)

    def _reap(self) -> None:
        ours = {c.process.pid: c for c in self.children if c.process is not None}
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = ours.get(pid)
            if child is not None and child.process.returncode is None:
                child.process.returncode = os.waitstatus_to_exitcode(status)

    def _stop_all(self) -> None:
        alive = [c for c in self.children if c.process is not None and c.process.poll() is None]
        for child in alive:
            log.info("stopping %s (pid %d)", child.name, child.process.pid)
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for child in alive:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing it", child.name, self.stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        for child in self.children:  # stragglers of an exited child's group (its stubs, its workers)
            if child.process is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.process.pid, signal.SIGKILL)


def healthcheck(port: int) -> int:
    """Docker's HEALTHCHECK: 0 when the gateway answers /v1/health/ready, else 1."""
    return 0 if answers_200(f"http://127.0.0.1:{port}/v1/health/ready", timeout_s=4.0) else 1

