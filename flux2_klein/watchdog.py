"""Keeping one tritonserver honest, for `flux2-klein serve` and the container alike: its Python-backend stubs
watched (a dead stub leaves Triton saying "ready" while its model fails every request), a bounded number of
logged restarts, its stubs killed with it, stale shared-memory regions removed, and a graceful stop that
lets the requests in flight finish before Triton is told to stop.

Why a stop needs more than SIGTERM: a stopping Triton refuses every new request, the sampler's internal
(BLS) calls included, so a request in the middle of its denoising loop would fail. Unloading the entry
model first (explicit model control, through the repository API that only we hold the key to) refuses new
requests from clients while those in flight finish; then SIGTERM stops an idle server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("flux2_klein")

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "triton_python_backend_shm_region_"
STUB_COMM = "triton_python_b"  # /proc/<pid>/comm keeps 15 characters of triton_python_backend_stub
# Triton APIs nobody outside this process needs, and which crash or reconfigure a server when misused
# (a backend's own shared-memory region registered and written into aborts tritonserver): they answer only
# requests carrying ADMIN_HEADER with this process's random key.
RESTRICTED_APIS = ("shared-memory", "model-repository", "trace", "logging")
ADMIN_HEADER = "flux2-klein-admin"


def new_admin_key() -> str:
    return secrets.token_hex(16)


def restriction_args(key: str) -> list[str]:
    apis = ",".join(RESTRICTED_APIS)
    return [f"--http-restricted-api={apis}:{ADMIN_HEADER}={key}",
            f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={key}"]


# -- processes ---------------------------------------------------------------------------------------------------

def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def stub_pids(server_pid: int) -> set[int]:
    """The Python-backend stubs tritonserver `server_pid` started (its children named like the stub)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == STUB_COMM and _ppid(int(entry.name)) == server_pid:
                    found.add(int(entry.name))
    return found


def repository_stubs(repository: Path):
    """(pid, argv) of each Python-backend stub on this machine serving a model of `repository`: the stub's
    first argument is its model file, REPO/MODEL/VERSION/model.py (python_backend src/stub_launcher.cc)."""
    root = str(Path(repository).resolve()) + os.sep
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() != STUB_COMM:
                continue
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0")]
            if len(argv) > 1 and argv[1].startswith(root):
                yield int(entry.name), argv


def kill_orphan_stubs(repository: Path) -> int:
    """SIGKILL stubs serving models of `repository` whose tritonserver is gone (the kernel re-parented them):
    a server killed with SIGKILL leaves them holding memory and /dev/shm. Stubs of other repositories (other
    servers on this machine) are left alone. The number killed."""
    killed = 0
    for pid, _ in repository_stubs(repository):
        with contextlib.suppress(OSError):
            parent = _ppid(pid)
            parent_comm = Path(f"/proc/{parent}/comm").read_text().strip() if parent and parent > 1 else ""
            if parent_comm != "tritonserver":
                os.kill(pid, signal.SIGKILL)
                killed += 1
    if killed:
        log.warning("killed %d Python-backend stub(s) of %s left by a tritonserver that died", killed, repository)
    return killed


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                    members.append(int(entry.name))
    return members


def kill_group(pgid: int, wait_s: float = 5.0) -> None:
    """SIGKILL a process group (a tritonserver started in a session of its own, and its stubs) and wait
    until its members are gone: only then are their /dev/shm regions unmapped and safe to remove."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)


# -- shared memory ------------------------------------------------------------------------------------------------

def _mapped_shm() -> set[str]:
    """Names of /dev/shm files some process we can see has mapped."""
    names = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                for line in (entry / "maps").read_text().splitlines():
                    if "/dev/shm/" in line:
                        names.add(line.split("/dev/shm/", 1)[1].split(" ")[0])
    return names


def clean_stale_shm(shm_dir: Path = SHM_DIR, min_age_s: float = 30.0) -> tuple[int, int]:
    """Remove Python-backend regions no process maps, untouched for `min_age_s` (a region is mapped within
    moments of its creation, so an older unmapped one belongs to a killed stub); (files, bytes) removed.
    Kubernetes keeps a memory-backed /dev/shm across container restarts: leftovers would add up."""
    try:
        candidates = [p for p in shm_dir.iterdir() if p.name.startswith(SHM_PREFIX)]
    except OSError:
        return 0, 0
    if not candidates:
        return 0, 0
    mapped, now, files, size = _mapped_shm(), time.time(), 0, 0
    for path in candidates:
        with contextlib.suppress(OSError):
            st = path.stat()
            if path.name not in mapped and now - st.st_mtime > min_age_s:
                path.unlink()
                files, size = files + 1, size + st.st_blocks * 512
    if files:
        log.info("removed %d stale Triton shared-memory region(s) from %s (%.1f MB)", files, shm_dir, size / 1e6)
    return files, size


def shm_regions(shm_dir: Path = SHM_DIR) -> set[str]:
    """Names of the Python-backend regions in `shm_dir` now."""
    try:
        return {p.name for p in shm_dir.iterdir() if p.name.startswith(SHM_PREFIX)}
    except OSError:
        return set()


def remove_regions_since(before: set[str], shm_dir: Path = SHM_DIR) -> tuple[int, int]:
    """Remove the Python-backend regions that were not in `before` (taken just before a tritonserver started)
    and that no process maps now: that server's own, once it and its stubs are gone; (files, bytes) removed.

    Why by name and not by age (clean_stale_shm): each stub's region is `triton_python_backend_shm_region_`
    plus a fresh UUID (python_backend r25.10, src/stub_launcher.cc, StubLauncher::Initialize), removed only
    when a SharedMemoryManager holding it is destroyed (src/shm_manager.cc, ~SharedMemoryManager: in
    tritonserver, or in the stub, as they exit normally). A group killed with SIGKILL (a restart, a stop
    past its timeout) removes none, and no later server reuses the names. A region written to or grown
    just before the kill has a fresh mtime (tmpfs updates it for writes through a mapping too), so the age
    threshold of the restart's cleanup left it behind until the next start (issue 19.9). What appeared
    while this server ran and is unmapped once its process group is dead was its; a region of another
    live server is mapped by it and stays.
    """
    new = shm_regions(shm_dir) - set(before)
    if not new:
        return 0, 0
    mapped, files, size = _mapped_shm(), 0, 0
    for name in sorted(new - mapped):
        with contextlib.suppress(OSError):
            blocks = (shm_dir / name).stat().st_blocks
            (shm_dir / name).unlink()
            files, size = files + 1, size + blocks * 512
    if files:
        log.info("removed %d shared-memory region(s) of the stopped tritonserver from %s (%.1f MB)", files, shm_dir,
                 size / 1e6)
    return files, size


def shm_usage(shm_dir: Path = SHM_DIR) -> tuple[int, int]:
    """(files, bytes in memory) of the Python-backend regions in `shm_dir`."""
    files = size = 0
    with contextlib.suppress(OSError):
        for p in shm_dir.iterdir():
            if p.name.startswith(SHM_PREFIX):
                with contextlib.suppress(OSError):
                    files, size = files + 1, size + p.stat().st_blocks * 512
    return files, size


# -- health and restarts ------------------------------------------------------------------------------------------

@dataclass
class StubWatch:
    """The stubs a ready tritonserver runs (`arm` once ready); `problem` names one that died since."""

    server_pid: int
    stubs: set[int] = field(default_factory=set)

    def arm(self) -> int:
        self.stubs = stub_pids(self.server_pid)
        return len(self.stubs)

    def problem(self) -> str | None:
        dead = sorted(pid for pid in self.stubs if not alive(pid))
        if dead:
            return f"Python-backend stub(s) {', '.join(map(str, dead))} of tritonserver {self.server_pid} died"
        return None


class RestartBudget:
    """At most `limit` restarts in any `window_s` seconds; past that the fault is not transient."""

    def __init__(self, limit: int = 5, window_s: float = 600.0):
        self.limit, self.window_s = limit, window_s
        self.times: deque[float] = deque()

    def allow(self) -> bool:
        now = time.monotonic()
        while self.times and now - self.times[0] > self.window_s:
            self.times.popleft()
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True


# -- graceful stop ----------------------------------------------------------------------------------------------------

def _admin(http_port: int, key: str, path: str, body: dict | None = None, timeout_s: float = 5.0):
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", method="POST",
                                     data=json.dumps(body or {}).encode(), headers={ADMIN_HEADER: key})
    with urllib.request.urlopen(request, timeout=timeout_s) as r:
        return json.loads(r.read() or b"null")


def drain(http_port: int, key: str, model: str, deadline: float) -> bool:
    """Unload `model` (new requests to it are refused, those in flight finish) and wait until it is gone or
    `deadline` (time.monotonic) passes; True when it drained. Triton must run with explicit model control."""
    try:
        _admin(http_port, key, f"/v2/repository/models/{model}/unload", {"parameters": {}},
               timeout_s=max(0.5, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            index = _admin(http_port, key, "/v2/repository/index", {"ready": False}, timeout_s=2.0)
            state = next((m.get("state") for m in index if m.get("name") == model), "UNAVAILABLE")
            if state not in ("READY", "UNLOADING", "LOADING"):
                return True
            time.sleep(0.2)
    except (urllib.error.URLError, OSError, ValueError) as e:
        log.warning("could not drain %s before stopping Triton (%s); stopping it now", model, e)
    return False
