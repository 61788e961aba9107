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
from typing import Callable

from ..contract import MODEL_NAME
from ..progress import log
from ..server import TritonProcess, answers_200
from ..watchdog import RestartBudget, StubWatch, clean_stale_shm, drain, kill_group, remove_regions_since, shm_regions
from .settings import Settings


@dataclass
class Child:
    """One supervised process: what it runs, and where it says it is ready."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    ready_url: str | None = None  # polled until it answers 200, to log when the child is ready
    # tritonserver: started again (within the supervisor's budget) when it dies or one of its Python stubs
    # does, once it has been ready; `drain(deadline)` lets its requests in flight finish before it stops.
    restartable: bool = False
    drain: Callable[[float], bool] | None = field(default=None, repr=False)
    process: subprocess.Popen | None = field(default=None, repr=False)
    ready: bool = False
    watch: StubWatch | None = field(default=None, repr=False)
    # tritonserver: /dev/shm's Python-backend regions just before this start; what appears beyond them and
    # nobody maps once its group is dead was its own (watchdog.remove_regions_since).
    shm_before: set[str] | None = field(default=None, repr=False)


def server_children(settings: Settings, repository: Path) -> list[Child]:
    """tritonserver on `repository` and the gateway in front of it, with their environments."""
    base = {**os.environ,
            "FLUX2_KLEIN_REPOSITORY": str(repository),
            "FLUX2_KLEIN_TRITON_GRPC_PORT": str(settings.triton_grpc_port),
            "FLUX2_KLEIN_TRITON_HTTP_PORT": str(settings.triton_http_port),
            "FLUX2_KLEIN_TRITON_METRICS_PORT": str(settings.triton_metrics_port)}
    address = settings.triton_address
    # Metrics on every interface: the PodMonitor and the autoscaler's adapter scrape them from outside the
    # pod. They are read-only; HTTP and gRPC stay on `address` (loopback) behind the gateway.
    triton = TritonProcess(repository, http_port=settings.triton_http_port, grpc_port=settings.triton_grpc_port,
                           metrics_port=settings.triton_metrics_port, address=address, metrics_address="0.0.0.0",
                           env={k: v for k, v in base.items() if k != "FLUX2_KLEIN_API_KEY"})
    drain_triton = None
    if settings.triton_command:
        triton_argv, triton_env = list(settings.triton_command), triton.base_env
    else:
        triton_argv, triton_env = triton.command(), triton.environment()

        def drain_triton(deadline: float) -> bool:
            return drain(triton.http_port, triton.admin_key, MODEL_NAME, deadline)
    gateway_argv = list(settings.gateway_command) or [
        sys.executable, "-m", "flux2_klein.cli", "gateway", "--port", str(settings.http_port),
        # 127.0.0.1, not localhost: Triton binds IPv4 and localhost may resolve to ::1 first
        "--triton-url", f"127.0.0.1:{settings.triton_grpc_port}",
    ]
    gateway_env = {**base, "FLUX2_KLEIN_GATEWAY_PORT": str(settings.http_port)}
    if settings.api_key:
        gateway_env["FLUX2_KLEIN_API_KEY"] = settings.api_key
    return [
        Child("tritonserver", triton_argv, triton_env, triton.ready_url, restartable=True, drain=drain_triton),
        Child("gateway", gateway_argv + list(settings.gateway_args), gateway_env,
              f"http://127.0.0.1:{settings.http_port}/v1/health/ready"),
    ]


class Supervisor:
    """Run children until one exits or we are told to stop; then stop the rest.

    Children start in their own sessions: a terminal's Ctrl-C reaches only us. A restartable child
    (tritonserver) that dies or loses a Python stub after it was ready is killed with its process group
    (its stubs) and started again, at most `budget` allows; meanwhile the gateway says not ready. On
    SIGTERM the others (the gateway: it stops taking requests and finishes those in flight) get SIGTERM
    first while tritonserver drains, then tritonserver gets it; whoever has not exited `stop_timeout`
    seconds after the signal is killed with its whole process group, so no stub is left holding GPU or
    shared memory. `reap` (on as PID 1) also collects orphans the kernel re-parents to us.
    """

    def __init__(self, children: list[Child], *, stop_timeout: float = 30.0, poll_s: float = 0.2,
                 reap: bool = False, budget: RestartBudget | None = None):
        self.children = children
        self.budget = budget or RestartBudget()
        self.stop_timeout = stop_timeout
        self.poll_s = poll_s
        self.reap = reap
        self._signal: int | None = None

    def _on_signal(self, signum, _frame) -> None:
        self._signal = signum

    def run(self) -> int:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            clean_stale_shm()  # a memory-backed /dev/shm outlives container restarts
            for child in self.children:
                log.info("starting %s: %s", child.name, shlex.join(child.argv))
                try:
                    self._start(child)
                except OSError as e:
                    log.error("%s: cannot start %s (%s)", child.name, child.argv[0], e)
                    return 1
            return self._watch()
        finally:
            self._stop_all()
            for s, h in previous.items():
                signal.signal(s, h)

    @staticmethod
    def _start(child: Child) -> None:
        if child.restartable:
            child.shm_before = shm_regions()
        child.process = subprocess.Popen(child.argv, env=child.env, start_new_session=True)
        child.ready, child.watch = False, None

    @staticmethod
    def _remove_regions(child: Child) -> None:
        """Once `child`'s group is dead: the /dev/shm regions it left (a killed tritonserver removes none)."""
        if child.shm_before is not None:
            remove_regions_since(child.shm_before)

    def _restart(self, child: Child, problem: str) -> bool:
        """Kill `child` with its group and start it again, when it may; False when it may not."""
        if not (child.restartable and child.watch is not None and self.budget.allow()):
            return False
        log.warning("%s; restarting %s (restart %d, at most %d in %.0f s)", problem, child.name,
                    len(self.budget.times), self.budget.limit, self.budget.window_s)
        kill_group(child.process.pid)
        child.process.wait()
        self._remove_regions(child)
        try:
            self._start(child)
        except OSError as e:
            log.error("%s: cannot start %s again (%s)", child.name, child.argv[0], e)
            return False
        return True

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
                problem = f"{child.name} exited with status {code}" if code is not None else \
                    child.watch.problem() if child.watch is not None else None
                if problem is None or self._restart(child, problem):
                    continue
                log.error("%s; stopping the others", problem)
                if code is None:
                    return 1
                return code if code > 0 else (128 - code if code < 0 else 1)
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + 1.0
                for child in self.children:
                    if child.ready_url and not child.ready and answers_200(child.ready_url, timeout_s=1.0):
                        child.ready = True
                        if child.restartable:
                            child.watch = StubWatch(child.process.pid)
                            child.watch.arm()
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
        deadline = time.monotonic() + self.stop_timeout
        alive = [c for c in self.children if c.process is not None and c.process.poll() is None]
        # The gateway first: it refuses new requests and waits for those in flight, which need Triton.
        front, back = [c for c in alive if c.drain is None], [c for c in alive if c.drain is not None]
        self._signal_and_wait(front, deadline, wait=False)
        for child in back:
            if child.ready and (child.watch is None or child.watch.problem() is None):
                child.drain(deadline)
        self._signal_and_wait(front, deadline, signal_first=False)
        self._signal_and_wait(back, deadline)
        self._kill_stragglers()

    def _signal_and_wait(self, children: list[Child], deadline: float, *, signal_first: bool = True,
                         wait: bool = True) -> None:
        if signal_first:
            for child in children:
                log.info("stopping %s (pid %d)", child.name, child.process.pid)
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        for child in children if wait else ():
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing it", child.name, self.stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()

    def _kill_stragglers(self) -> None:
        for child in self.children:  # stragglers of an exited child's group (its stubs, its workers)
            if child.process is not None:
                kill_group(child.process.pid)  # and wait until they are gone: then their regions are unmapped
                self._remove_regions(child)


def healthcheck(port: int) -> int:
    """Docker's HEALTHCHECK: 0 when the gateway answers /v1/health/ready, else 1."""
    return 0 if answers_200(f"http://127.0.0.1:{port}/v1/health/ready", timeout_s=4.0) else 1

