"""Starting tritonserver on a repository: `TritonProcess` (start, wait until ready, stop, its log), used by
`flux2-klein serve`, the container, the demo, the tests and the GPU benchmark; and `free_port`.

Uses the container's own `tritonserver` where there is one (NGC images: /opt/tritonserver), else the
build bundled in the nvidia-pytriton wheel, whose Python backend needs its stub for this interpreter
put beside it: that is assembled once in a cache folder, never inside site-packages.

(Just over 400 lines: one tritonserver process's whole life - found, started, ready, stopped, and `serve`'s
supervision of it - in one place; its stub and /dev/shm bookkeeping is watchdog.py's.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .contract import MODEL_NAME
from .progress import log
from .watchdog import (
    RestartBudget, StubWatch, alive, clean_stale_shm, drain, kill_group, kill_orphan_stubs, new_admin_key,
    remove_regions_since, restriction_args, shm_regions, stub_pids,
)

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
                   metrics_port: int, extra: tuple[str, ...] = (), *, address: str = "127.0.0.1",
                   metrics_address: str | None = None, admin_key: str | None = None) -> list[str]:
    """tritonserver's command line. `address`: the interface HTTP and gRPC bind (loopback unless widened:
    Triton's own API has requests that abort the server); `metrics_address` (default `address`) for
    Prometheus; `admin_key`: the key of the restricted APIs (watchdog.RESTRICTED_APIS; None: a new one)."""
    cmd = [
        str(install.binary), f"--model-repository={repository}",
        f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
        f"--http-address={address}", f"--grpc-address={address}", f"--metrics-address={metrics_address or address}",
        f"--cache-config=local,size={RESPONSE_CACHE_BYTES}",
        f"--backend-config=python,shm-default-byte-size={SHM_BYTES}",
        f"--backend-config=python,shm-growth-byte-size={SHM_BYTES}",
        # Explicit model control, every model loaded at start: what lets a stop unload the entry model first
        # (watchdog.drain) so that requests in flight finish before Triton stops.
        "--model-control-mode=explicit", "--load-model=*",
        *restriction_args(admin_key or new_admin_key()),
        "--exit-on-error=true", "--strict-readiness=true", "--log-info=true",
    ]
    if install.backend_dir is not None:
        cmd.append(f"--backend-directory={install.backend_dir}")
    if install.cache_dir is not None:
        cmd.append(f"--cache-directory={install.cache_dir}")
    return cmd + list(extra)


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers_200(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a GET of `url` answers 200 now; False for any failure to connect or answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_ready(http_port: int, process: subprocess.Popen | None = None, timeout_s: float = 300) -> bool:
    """Poll /v2/health/ready until 200; False if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return False
        if answers_200(f"http://127.0.0.1:{http_port}/v2/health/ready"):
            return True
        time.sleep(0.5)
    return False


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies (Linux prctl), so a `serve`
    killed with SIGKILL leaves no server behind; its stubs are then `kill_orphan_stubs`' business."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TritonNotReady(RuntimeError):
    """tritonserver exited while loading (`exited`) or was not ready in time; the message ends with its log."""

    def __init__(self, message: str, *, exited: bool, log_tail: str = ""):
        super().__init__(message)
        self.exited = exited
        self.log_tail = log_tail


# Triton's Python backend now and then aborts while many stubs start on a loaded machine
# (boost::interprocess::lock_exception, a known Triton issue): that failure, and only that, earns a retry.
RETRY_MARK = "lock_exception"


class TritonProcess:
    """One tritonserver on `repository`, as a child process.

    Ports left as None are free ones picked now. `env` is the base environment (default os.environ);
    the tritonserver install's own variables go on top, then `path` entries first on PATH (the Python
    models' interpreter is the first python on it) and `library_path` entries first on LD_LIBRARY_PATH.
    `log_path`: stdout and stderr go there (None: inherited). `new_session`: a process group of its
    own, so a terminal's Ctrl-C does not reach it directly. `address`, `metrics_address`: as in
    server_command; `admin_key` (default: a new random one) opens the restricted APIs to us alone.
    """

    def __init__(self, repository: str | Path, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 path: Sequence[str | Path] = (), library_path: Sequence[str | Path] = (),
                 log_path: str | Path | None = None, cwd: str | Path | None = None,
                 install: TritonInstall | None = None, new_session: bool = False, address: str = "127.0.0.1",
                 metrics_address: str | None = None, admin_key: str | None = None, die_with_parent: bool = False):
        self.repository = Path(repository).resolve()
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.extra_args = tuple(extra_args)
        self.base_env = dict(os.environ if env is None else env)
        self.path, self.library_path = [str(p) for p in path], [str(p) for p in library_path]
        self.log_path = Path(log_path) if log_path is not None else None
        self.cwd, self.new_session = cwd, new_session
        self._install = install
        self.address, self.metrics_address = address, metrics_address
        self.admin_key = admin_key or new_admin_key()
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen | None = None
        self._log = None
        self._shm_before: set[str] | None = None  # /dev/shm's regions when it started (watchdog.remove_regions_since)

    @property
    def install(self) -> TritonInstall:
        if self._install is None:
            self._install = find_tritonserver()
        return self._install

    # -- what runs ---------------------------------------------------------------------------------------------

    def command(self) -> list[str]:
        return server_command(self.install, self.repository, self.http_port, self.grpc_port, self.metrics_port,
                              self.extra_args, address=self.address, metrics_address=self.metrics_address,
                              admin_key=self.admin_key)

    def environment(self) -> dict[str, str]:
        env = {**self.base_env, **self.install.env}
        for key, first in (("PATH", self.path), ("LD_LIBRARY_PATH", self.library_path)):
            if first:
                env[key] = os.pathsep.join([*first, *filter(None, [env.get(key)])])
        return env

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v2/health/ready"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"  # Triton binds IPv4 loopback; localhost may mean ::1 first

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url

    # -- its life ------------------------------------------------------------------------------------------------

    def start(self) -> TritonProcess:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "wb")
        out = self._log if self._log is not None else None
        self._shm_before = shm_regions()
        self.process = subprocess.Popen(self.command(), env=self.environment(), cwd=self.cwd, stdout=out,
                                        stderr=subprocess.STDOUT if out is not None else None,
                                        start_new_session=self.new_session,
                                        preexec_fn=_die_with_parent if self.die_with_parent else None)
        return self

    def wait_ready(self, timeout_s: float = 600) -> None:
        """Return once /v2/health/ready answers 200; else stop it and raise TritonNotReady."""
        if wait_ready(self.http_port, self.process, timeout_s):
            return
        exited = self.process.poll() is not None
        self.stop()
        tail = self.log_tail()
        what = f"exited with status {self.process.returncode} while loading" if exited else \
            f"was not ready within {timeout_s:.0f} s"
        raise TritonNotReady(f"tritonserver on {self.repository} {what}; its log ends:\n{tail}",
                             exited=exited, log_tail=tail)

    def stop(self, timeout_s: float = 60) -> int | None:
        """SIGTERM (Triton finishes the requests in flight), SIGKILL after `timeout_s`; the exit status.
        Its Python-backend stubs die with it (a stub outliving its server holds memory and /dev/shm), and
        then the /dev/shm regions it left (killed, it removes none) go: /dev/shm is left as it was found."""
        if self.process is not None and self.process.poll() is None:
            stubs = stub_pids(self.process.pid)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            for pid in stubs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0  # a killed stub unmaps its regions as it exits
            while any(alive(pid) for pid in stubs) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.process is not None and self.new_session:
            kill_group(self.process.pid)  # stubs re-parented after a killed server; waits until they are gone
        if self._shm_before is not None:
            remove_regions_since(self._shm_before)
            self._shm_before = None  # once: a second stop() has nothing of ours to remove
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode if self.process is not None else None

    def log_tail(self, chars: int = 6000) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log file: it went to this process's output)"
        return self.log_path.read_text(errors="replace")[-chars:]

    @classmethod
    def launch(cls, repository: str | Path, *, log_path: str | Path, timeout_s: float = 600, **kwargs) -> TritonProcess:
        """Start and wait until ready, with one more start (new ports, log `<stem>-2<suffix>`) when the
        first died of RETRY_MARK."""
        log_path = Path(log_path)
        for attempt in (1, 2):
            where = log_path if attempt == 1 else log_path.with_name(f"{log_path.stem}-2{log_path.suffix}")
            server = cls(repository, log_path=where, **kwargs).start()
            try:
                server.wait_ready(timeout_s)
                return server
            except TritonNotReady as e:
                if attempt == 2 or RETRY_MARK not in e.log_tail:
                    raise
        raise AssertionError("unreachable")

    def __enter__(self) -> TritonProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _ready_line(server: TritonProcess, seconds: float) -> str:
    models = sorted(p.parent.name for p in server.repository.glob("*/config.pbtxt"))
    line = (f"flux2-klein serve: ready in {seconds:.1f} s; HTTP {server.address}:{server.http_port}, gRPC "
            f"{server.address}:{server.grpc_port}, metrics {server.metrics_address or server.address}:"
            f"{server.metrics_port}; models: {', '.join(models)}")
    from .target import gpu_facts

    if gpu_facts()[0] == "cpu":
        line += " (no GPU here: the CUDA and NVML errors above are expected on a CPU-only machine)"
    return line


def _stop_gracefully(server: TritonProcess, watch: StubWatch | None, grace_s: float) -> None:
    """Refuse new requests, let those in flight finish (within `grace_s`), then stop Triton and its stubs."""
    deadline = time.monotonic() + grace_s
    healthy = watch is not None and watch.problem() is None
    if healthy and drain(server.http_port, server.admin_key, MODEL_NAME, deadline):
        log.info("requests in flight finished; stopping tritonserver")
    # A dead stub makes Triton wait its whole exit timeout for an answer that never comes: no point asking.
    wait_s = max(5.0, deadline - time.monotonic()) if healthy else 2.0
    with contextlib.suppress(ProcessLookupError):
        server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        log.warning("tritonserver did not stop within %.0f s: killing it", wait_s)
    kill_group(server.process.pid)
    server.stop()


def serve(repository: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
          extra: tuple[str, ...] = (), *, address: str = "127.0.0.1", grace_s: float = 30.0,
          budget: RestartBudget | None = None, poll_s: float = 0.5) -> int:
    """Run tritonserver in the foreground, supervised, until we are told to stop (0) or it cannot run.

    Once ready, a tritonserver that dies, or one of whose Python stubs dies, is killed with its stubs and
    started again (at most `budget`'s restarts, default 5 in 10 minutes; then status 1). One that exits
    before it is ready gives its own exit status. SIGTERM/SIGINT: new requests are refused, those in flight
    get up to `grace_s` seconds to finish, then Triton stops.
    """
    repository = Path(repository).resolve()
    if not (repository / MODEL_NAME / "config.pbtxt").is_file():
        raise FileNotFoundError(f"repository: {repository} has no {MODEL_NAME}/config.pbtxt; "
                                "run `flux2-klein build` first")
    budget = budget or RestartBudget()
    stop_signal: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _f: stop_signal.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    server = None
    try:
        kill_orphan_stubs(repository)  # of a server killed with `serve` itself (SIGKILL, OOM killer)
        clean_stale_shm()  # those of servers killed before we started
        while True:
            # A session of its own: its stubs share its process group, so one killpg takes them all.
            server = TritonProcess(repository, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                                   extra_args=extra, address=address, new_session=True,
                                   die_with_parent=True).start()
            started, watch, problem = time.monotonic(), None, None
            while problem is None:
                if stop_signal:
                    log.info("%s received: stopping", signal.Signals(stop_signal[0]).name)
                    _stop_gracefully(server, watch, grace_s)
                    return 0
                code = server.process.poll()
                if code is not None:
                    if watch is None:
                        return code
                    problem = f"tritonserver exited with status {code}"
                elif watch is None:
                    if answers_200(server.ready_url, timeout_s=1.0):
                        watch = StubWatch(server.process.pid)
                        watch.arm()
                        print(_ready_line(server, time.monotonic() - started), file=sys.stderr, flush=True)
                else:
                    problem = watch.problem()
                if problem is None:
                    time.sleep(poll_s)
            kill_group(server.process.pid)
            server.stop(timeout_s=10)  # and the regions the killed group left in /dev/shm
            if not budget.allow():
                log.error("%s; %d restarts within %.0f s already: giving up", problem, budget.limit, budget.window_s)
                return 1
            log.warning("%s; restarting tritonserver (restart %d, at most %d in %.0f s)", problem,
                        len(budget.times), budget.limit, budget.window_s)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if server is not None:  # every exit: no server, stub or /dev/shm region of ours stays
            if server.process.poll() is None:
                kill_group(server.process.pid)
                server.process.wait()
            server.stop()
