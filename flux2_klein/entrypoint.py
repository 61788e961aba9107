"""The serving container's entrypoint: `python -m flux2_klein.entrypoint`.

On each start, in order:

1. settings from the environment (`ENV_VARS` below; `--help` prints them);
2. the checkpoint mounted at FLUX2_KLEIN_CHECKPOINT is checked with `load_checkpoint`: exit 2 with the reason
   when it is missing or not a FLUX.2 [klein] checkpoint;
3. a *profile key* names what a built repository depends on: the GPU's name and compute capability, the
   TensorRT version, the precision, the runtime, a fingerprint of the checkpoint and one of the code that
   writes repositories (`profile_components`);
4. `<cache>/<key>/repository` is reused when complete and built for exactly that profile, else built in a
   temporary folder beside it and renamed into place, so that a build killed midway leaves only a
   temporary folder (removed on the next start), never a half repository that looks finished. A lock file
   lets replicas that share one cache volume build each profile once: the others wait, then reuse it;
5. tritonserver and the HTTP gateway run as children. If either exits, the other is stopped and we exit
   non-zero (the orchestrator restarts the container); SIGTERM or SIGINT stops both (SIGTERM, then SIGKILL
   after FLUX2_KLEIN_STOP_TIMEOUT seconds) and we exit 0.

Exit status: 0 stopped on request; 1 a build or a child failed (a child's own status when it had one);
2 a setting, the checkpoint or the cache is unusable; 128+N stopped by signal N during a build.

`--build-only` does steps 1-4 and prints the repository's path (to warm a cache, or as an init container);
`--healthcheck` exits 0 when the gateway answers /v1/health/ready (Docker's HEALTHCHECK).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

from .progress import log, setup_logging, step

PRECISIONS = ("fp8", "bf16")
RUNTIMES = ("tensorrt", "onnxruntime")

# (name, default, meaning): the container's whole configuration surface.
ENV_VARS: tuple[tuple[str, str, str], ...] = (
    ("FLUX2_KLEIN_CHECKPOINT", "/models/checkpoint", "the checkpoint folder (diffusers layout), mounted read-only"),
    ("FLUX2_KLEIN_CACHE", "/cache", "writable volume for built repositories: <cache>/<profile-key>/repository"),
    ("FLUX2_KLEIN_PRECISION", "fp8", "precision of the TensorRT engines: fp8 | bf16"),
    ("FLUX2_KLEIN_RUNTIME", "tensorrt", "what runs the networks: tensorrt (GPU) | onnxruntime (CPU, for checks)"),
    ("FLUX2_KLEIN_GATEWAY_PORT", "8000", "the gateway's port (NIM-style /v1 API): the one port to publish. "
                                         "The gateway's other FLUX2_KLEIN_GATEWAY_* variables reach it as they are"),
    ("FLUX2_KLEIN_TRITON_GRPC_PORT", "8001", "Triton's gRPC port, which the gateway talks to"),
    ("FLUX2_KLEIN_TRITON_METRICS_PORT", "8002", "Triton's Prometheus metrics (all interfaces, for scraping)"),
    ("FLUX2_KLEIN_TRITON_HTTP_PORT", "8003", "Triton's own KServe HTTP port (readiness, debugging)"),
    ("FLUX2_KLEIN_TRITON_ADDRESS", "127.0.0.1", "interface Triton's HTTP and gRPC ports bind; 0.0.0.0 exposes them"),
    ("FLUX2_KLEIN_API_KEY", "", "the gateway's bearer key (its own variable), kept from tritonserver's "
                                "environment; empty: no authentication"),
    ("FLUX2_KLEIN_GATEWAY_ARGS", "", "extra arguments appended to the gateway's command line"),
    ("FLUX2_KLEIN_GATEWAY_COMMAND", "", "replaces the gateway's command line (default: flux2-klein gateway ...)"),
    ("FLUX2_KLEIN_TRITON_COMMAND", "", "replaces tritonserver's command line (tests, debugging); it gets "
                                 "FLUX2_KLEIN_REPOSITORY in its environment"),
    ("FLUX2_KLEIN_ONNX_DIR", "", "reuse graphs already written by `flux2-klein export onnx` instead of exporting"),
    ("FLUX2_KLEIN_CHECKPOINT_REVISION", "", "any string mixed into the profile key (e.g. the checkpoint's commit); "
                                      "change it when weights changed where the fingerprint does not look"),
    ("FLUX2_KLEIN_REBUILD", "0", "1: rebuild the repository on this start even when the cached one is fresh"),
    ("FLUX2_KLEIN_STOP_TIMEOUT", "30", "seconds the children get to stop after SIGTERM before SIGKILL"),
)
DEFAULTS = {name: default for name, default, _ in ENV_VARS}

KEY_SCHEMA = 1  # bump when the meaning of a profile component changes
PROFILE_FILE = "profile.json"  # inside the repository: written last, before the rename that publishes it
SMALL_FILE_BYTES = 4 << 20  # files up to this size are hashed whole
SAMPLE_BYTES = 1 << 20  # larger ones: the first and the last MiB (after a safetensors header, whole)
LEFTOVER_PREFIXES = (".building-", ".stale-")


class ConfigError(ValueError):
    """A setting or the environment cannot work; the message says which and what to do."""


class Stopped(BaseException):
    """SIGTERM/SIGINT while preparing: unwinds through the build (BaseException: no `except Exception`
    in a builder swallows it) so that its temporary folder is removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Settings:
    checkpoint: Path = Path(DEFAULTS["FLUX2_KLEIN_CHECKPOINT"])
    cache: Path = Path(DEFAULTS["FLUX2_KLEIN_CACHE"])
    precision: str = DEFAULTS["FLUX2_KLEIN_PRECISION"]
    runtime: str = DEFAULTS["FLUX2_KLEIN_RUNTIME"]
    http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_http_port: int = 8003
    triton_address: str = "127.0.0.1"
    api_key: str = ""
    gateway_args: tuple[str, ...] = ()
    gateway_command: tuple[str, ...] = ()
    triton_command: tuple[str, ...] = ()
    onnx_dir: Path | None = None
    checkpoint_revision: str = ""
    rebuild: bool = False
    stop_timeout: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(name, DEFAULTS[name]).strip()

        def choice(name: str, allowed: tuple[str, ...]) -> str:
            value = get(name).lower()
            if value not in allowed:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
            return value

        def port(name: str) -> int:
            value = get(name)
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise ConfigError(f"{name}: {value!r} is not a port number (1..65535)")
            return int(value)

        def words(name: str) -> tuple[str, ...]:
            try:
                return tuple(shlex.split(get(name)))
            except ValueError as e:
                raise ConfigError(f"{name}: cannot split {get(name)!r} into words ({e})") from None

        ports = {name: port(name) for name in ("FLUX2_KLEIN_GATEWAY_PORT", "FLUX2_KLEIN_TRITON_GRPC_PORT",
                                               "FLUX2_KLEIN_TRITON_METRICS_PORT", "FLUX2_KLEIN_TRITON_HTTP_PORT")}
        if len(set(ports.values())) != len(ports):
            raise ConfigError("ports: " + ", ".join(f"{k}={v}" for k, v in ports.items()) + " must all differ")
        try:
            stop_timeout = float(get("FLUX2_KLEIN_STOP_TIMEOUT"))
        except ValueError:
            raise ConfigError(f"FLUX2_KLEIN_STOP_TIMEOUT: {get('FLUX2_KLEIN_STOP_TIMEOUT')!r} is not a number of seconds") from None
        rebuild = get("FLUX2_KLEIN_REBUILD").lower()
        if rebuild not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"FLUX2_KLEIN_REBUILD: {rebuild!r} is not 0 or 1")
        return cls(
            checkpoint=Path(get("FLUX2_KLEIN_CHECKPOINT")),
            cache=Path(get("FLUX2_KLEIN_CACHE")),
            precision=choice("FLUX2_KLEIN_PRECISION", PRECISIONS),
            runtime=choice("FLUX2_KLEIN_RUNTIME", RUNTIMES),
            http_port=ports["FLUX2_KLEIN_GATEWAY_PORT"],
            triton_grpc_port=ports["FLUX2_KLEIN_TRITON_GRPC_PORT"],
            triton_metrics_port=ports["FLUX2_KLEIN_TRITON_METRICS_PORT"],
            triton_http_port=ports["FLUX2_KLEIN_TRITON_HTTP_PORT"],
            triton_address=get("FLUX2_KLEIN_TRITON_ADDRESS") or "127.0.0.1",
            api_key=env.get("FLUX2_KLEIN_API_KEY", ""),
            gateway_args=words("FLUX2_KLEIN_GATEWAY_ARGS"),
            gateway_command=words("FLUX2_KLEIN_GATEWAY_COMMAND"),
            triton_command=words("FLUX2_KLEIN_TRITON_COMMAND"),
            onnx_dir=Path(get("FLUX2_KLEIN_ONNX_DIR")) if get("FLUX2_KLEIN_ONNX_DIR") else None,
            checkpoint_revision=get("FLUX2_KLEIN_CHECKPOINT_REVISION"),
            rebuild=rebuild in ("1", "true", "yes"),
            stop_timeout=max(0.0, stop_timeout),
        )


# ------------------------------------------------------------------------------------------ device facts

@dataclass(frozen=True)
class Facts:
    """What a TensorRT engine is specific to. Without a GPU: gpu "cpu", compute capability "none"."""

    gpu: str
    compute_capability: str
    tensorrt: str


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
    """The version of the `tensorrt` module that builds the engines; "none" where it does not import."""
    try:
        import tensorrt
    except Exception:  # absent, or its libraries are: either way no engine can be built here
        return "none"
    return str(getattr(tensorrt, "__version__", "unknown"))


def detect_facts() -> Facts:
    gpu, capability = gpu_facts()
    return Facts(gpu=gpu, compute_capability=capability, tensorrt=tensorrt_version())


# ------------------------------------------------------------------------------------------- fingerprints

def _visible_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every file below root, sorted, skipping dot-files and dot-folders:
    huggingface_hub's `.cache/` download metadata (timestamps), `.git`, Kubernetes' `..data` links."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), path))
    return iter(sorted(found))


def checkpoint_fingerprint(root: str | Path) -> str:
    """SHA-256 over the checkpoint's file names, sizes and contents, reading at most ~2 MiB per large file.

    Files up to 4 MiB (configs, tokenizer, index files) are hashed whole. A larger file (the weights)
    contributes its size, its safetensors header (every tensor's name, dtype, shape and offsets) and its
    first and last MiB. No mtimes: the same checkpoint copied to another volume or node gets new ones,
    which would make replicas sharing one engine cache rebuild for nothing, while `cp -p` and rsync keep
    old mtimes on new content. What this cannot see: weights edited in place in the middle of a file with
    the same size and header (a partial fine-tune saved over the original); set FLUX2_KLEIN_CHECKPOINT_REVISION
    (or FLUX2_KLEIN_REBUILD=1) for those. Reading 16 GB on every start to be exact was the alternative.
    """
    root = Path(root)
    h = hashlib.sha256()
    for rel, path in _visible_files(root):
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= SMALL_FILE_BYTES:
                h.update(hashlib.sha256(f.read()).digest())
                continue
            if rel.endswith(".safetensors"):
                n = int.from_bytes(f.read(8), "little")
                if 0 < n <= min(size - 8, 256 << 20):
                    h.update(hashlib.sha256(f.read(n)).digest())
            f.seek(0)
            h.update(hashlib.sha256(f.read(SAMPLE_BYTES)).digest())
            f.seek(size - SAMPLE_BYTES)
            h.update(hashlib.sha256(f.read(SAMPLE_BYTES)).digest())
    return h.hexdigest()


# Sources whose change changes what a build writes: configs, glue, graphs, engines (an image with other
# code must not serve a repository an older one wrote). Anything else (the gateway, the CLI, this file)
# can change without invalidating a cache.
CODE_FILES = ("repository.py", "specs.py", "triton_config.py", "sizes.py", "triton_tensors.py")
CODE_PACKAGES = ("flux2_klein.export", "flux2_klein.model_repository")


def code_fingerprint() -> str:
    from . import __version__

    h = hashlib.sha256(__version__.encode())
    here = Path(__file__).parent
    files = [(f"flux2_klein/{name}", here / name) for name in CODE_FILES]
    for package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)  # finds without importing (export imports torch)
        for location in (spec.submodule_search_locations or []) if spec else []:
            # .py and data alike (FP8 calibration prompts shape the engines too)
            files += [(f"{package}/{p.name}", p) for p in sorted(Path(location).iterdir())
                      if p.is_file() and p.suffix not in (".pyc", ".pyo")]
    for rel, path in sorted(files):
        if path.is_file():
            h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def profile_components(settings: Settings, facts: Facts, checkpoint_hash: str, code_hash: str) -> dict:
    return {
        "schema": KEY_SCHEMA,
        "gpu": facts.gpu,
        "compute_capability": facts.compute_capability,
        "tensorrt": facts.tensorrt,
        "precision": settings.precision,
        "runtime": settings.runtime,
        "checkpoint": checkpoint_hash,
        "checkpoint_revision": settings.checkpoint_revision,
        "code": code_hash,
    }


def profile_key(components: Mapping) -> str:
    """`<runtime>-<precision>-<arch>-<16 hex digits>`: readable in a listing of the cache, the digest over
    every component (the readable part is for people deleting old profiles, not for identity)."""
    blob = json.dumps(dict(components), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    cc = str(components.get("compute_capability", "none"))
    arch = "sm" + cc.replace(".", "") if cc.replace(".", "").isdigit() else "cpu"
    return f"{components.get('runtime')}-{components.get('precision')}-{arch}-{digest}"


# --------------------------------------------------------------------------------------- the engine cache

def staleness(repository: Path, key: str, components: Mapping) -> str | None:
    """Why `repository` cannot be reused for this profile; None when it can."""
    if not repository.is_dir():
        return "none built yet"
    if not (repository / "build.json").is_file() or not (repository / "flux2_klein" / "config.pbtxt").is_file():
        return "incomplete (no build.json or ensemble)"
    try:
        meta = json.loads((repository / PROFILE_FILE).read_text())
    except (OSError, ValueError):
        return f"no readable {PROFILE_FILE}"
    if meta.get("key") != key or meta.get("components") != dict(components):
        return f"{PROFILE_FILE} describes another profile"
    return None


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[bool]:
    """An exclusive flock on `path` (True), or no lock where the filesystem has none (False)."""
    import fcntl

    with open(path, "a+") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("engine cache: another process is building this profile; waiting for it")
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK on an NFS mount without a lock manager
            log.warning("engine cache: cannot lock %s (%s); building without a lock", path, e)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(home: Path, locked: bool) -> None:
    """Temporary folders of interrupted builds. Under the lock none can be in use; without one, only
    those untouched for a day are surely dead."""
    for path in home.iterdir():
        if path.name.startswith(LEFTOVER_PREFIXES) and path.is_dir():
            if locked or time.time() - path.stat().st_mtime > 86400:
                log.info("engine cache: removing %s (left by an interrupted build)", path.name)
                shutil.rmtree(path, ignore_errors=True)


def ensure_repository(cache: Path, key: str, components: Mapping, build: Callable[[Path], object], *,
                      force: bool = False) -> Path:
    """`<cache>/<key>/repository`, reused when fresh, else built by `build(out)` and published by rename."""
    home = Path(cache) / key
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / ".writable"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"FLUX2_KLEIN_CACHE: cannot write to {home} ({e}); mount a writable volume there, owned "
                          f"by or group-writable for uid {os.getuid()} (Kubernetes: securityContext.fsGroup)") from None
    final = home / "repository"
    with _build_lock(home / ".lock") as locked:
        reason = "FLUX2_KLEIN_REBUILD is set" if force else staleness(final, key, components)
        if reason is None:
            log.info("engine cache: reusing %s", final)
            return final
        log.info("engine cache: building %s (%s)", final, reason)
        _remove_leftovers(home, locked)
        tmp = Path(tempfile.mkdtemp(prefix=LEFTOVER_PREFIXES[0], dir=home))
        old = None
        try:
            with step(f"build repository for profile {key}"):
                build(tmp / "repository")
            meta = {"key": key, "components": dict(components), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / "repository" / PROFILE_FILE).write_text(json.dumps(meta, indent=1))
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=LEFTOVER_PREFIXES[1], dir=home)) / "repository"
                os.rename(final, old)
            os.rename(tmp / "repository", final)  # atomic: a reader sees all of it or none
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old.parent, ignore_errors=True)
        log.info("engine cache: %s ready", final)
        return final


def build_for_runtime(checkpoint: Path, out: Path, *, runtime: str, precision: str,
                      onnx_dir: Path | None = None) -> Path:
    """The one place that knows how each runtime's build is called."""
    import inspect

    from .repository import build_repository

    kwargs: dict = {"onnx_dir": onnx_dir} if onnx_dir is not None else {}
    if runtime == "tensorrt":
        if "work" in inspect.signature(build_repository).parameters:
            # ONNX exports and calibration beside the repository, inside the build's temporary folder:
            # removed with it, never mistaken for a finished build's.
            kwargs["work"] = Path(out).parent / "work"
        return build_repository(checkpoint, out, runtime="tensorrt", precision=precision, **kwargs)
    # ONNX Runtime is the CPU path for checks: float32 graphs whatever FLUX2_KLEIN_PRECISION says (it stays
    # in the profile key all the same).
    return build_repository(checkpoint, out, runtime="onnxruntime", **kwargs)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """While preparing, SIGTERM/SIGINT raise Stopped. As PID 1 in a container a signal with the default
    disposition is simply ignored, so without this `docker stop` would wait for its SIGKILL."""
    def handler(signum, _frame):
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def prepare(settings: Settings, *, facts: Facts | None = None, builder: Callable[..., object] | None = None) -> Path:
    """Steps 2-4: check the checkpoint, derive the profile, reuse or build its repository."""
    with _stop_on_signals():
        return _prepare(settings, facts, builder)


def _prepare(settings: Settings, facts: Facts | None, builder: Callable[..., object] | None) -> Path:
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(settings.checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"{e} -- mount a FLUX.2 [klein] checkpoint (diffusers layout) at "
                              f"{settings.checkpoint} or point FLUX2_KLEIN_CHECKPOINT at one") from None
    log.info("checkpoint: %s is a FLUX.2 [klein] checkpoint", settings.checkpoint)
    facts = facts or detect_facts()
    log.info("device: %s (compute capability %s), TensorRT %s, runtime %s, precision %s",
             facts.gpu, facts.compute_capability, facts.tensorrt, settings.runtime, settings.precision)
    if settings.runtime == "tensorrt":
        if facts.gpu == "cpu":
            raise ConfigError("FLUX2_KLEIN_RUNTIME=tensorrt needs an NVIDIA GPU and nvidia-smi shows none: give the "
                              "container one (docker run --gpus 1; Kubernetes nvidia.com/gpu: 1), or set "
                              "FLUX2_KLEIN_RUNTIME=onnxruntime for the CPU path")
        if facts.tensorrt == "none":
            raise ConfigError("FLUX2_KLEIN_RUNTIME=tensorrt needs TensorRT's Python module (`import tensorrt` fails); "
                              "the image installs it matching the TensorRT that Triton serves with")
    with step("checkpoint fingerprint"):
        checkpoint_hash = checkpoint_fingerprint(settings.checkpoint)
    components = profile_components(settings, facts, checkpoint_hash, code_fingerprint())
    key = profile_key(components)
    log.info("profile: %s", key)
    builder = builder or build_for_runtime

    def build(out: Path):
        return builder(settings.checkpoint, out, runtime=settings.runtime, precision=settings.precision,
                       onnx_dir=settings.onnx_dir)

    return ensure_repository(settings.cache, key, components, build, force=settings.rebuild)


# ---------------------------------------------------------------------------------------- the children

@dataclass
class Child:
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
    triton_env = {k: v for k, v in base.items() if k != "FLUX2_KLEIN_API_KEY"}
    if settings.triton_command:
        triton_argv = list(settings.triton_command)
    else:
        from .server import find_tritonserver, server_command

        install = find_tritonserver()
        triton_env.update(install.env)
        address = settings.triton_address
        triton_argv = server_command(install, repository, settings.triton_http_port, settings.triton_grpc_port,
                                     settings.triton_metrics_port,
                                     extra=(f"--http-address={address}", f"--grpc-address={address}"))
    gateway_argv = list(settings.gateway_command) or [
        sys.executable, "-m", "flux2_klein.cli", "gateway", "--port", str(settings.http_port),
        # 127.0.0.1, not localhost: Triton binds IPv4 and localhost may resolve to ::1 first
        "--triton-url", f"127.0.0.1:{settings.triton_grpc_port}",
    ]
    gateway_env = {**base, "FLUX2_KLEIN_GATEWAY_PORT": str(settings.http_port)}
    if settings.api_key:
        gateway_env["FLUX2_KLEIN_API_KEY"] = settings.api_key
    return [
        Child("tritonserver", triton_argv, triton_env,
              f"http://127.0.0.1:{settings.triton_http_port}/v2/health/ready"),
        Child("gateway", gateway_argv + list(settings.gateway_args), gateway_env,
              f"http://127.0.0.1:{settings.http_port}/v1/health/ready"),
    ]


def _answers_200(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


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
                    if child.ready_url and not child.ready and _answers_200(child.ready_url):
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


# ----------------------------------------------------------------------------------------------- main

def healthcheck(port: int) -> int:
    return 0 if _answers_200(f"http://127.0.0.1:{port}/v1/health/ready", timeout_s=4.0) else 1


def _env_help() -> str:
    width = max(len(name) for name, _, _ in ENV_VARS)
    lines = [f"  {name:<{width}}  {default or '(empty)':<18}  {meaning}" for name, default, meaning in ENV_VARS]
    return "environment (name, default, meaning):\n" + "\n".join(lines)


def main(argv: list[str] | None = None, *, facts: Facts | None = None,
         builder: Callable[..., object] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flux2_klein.entrypoint",
        description="The serving container's entrypoint: check the checkpoint, reuse or build the Triton "
                    "repository for this GPU in the cache, then run tritonserver and the HTTP gateway.",
        epilog=_env_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--build-only", action="store_true",
                      help="prepare the repository in the cache, print its path and exit")
    mode.add_argument("--healthcheck", action="store_true",
                      help="exit 0 when the gateway answers /v1/health/ready, else 1")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from .checkpoint import CheckpointError

    try:
        settings = Settings.from_env()
    except ConfigError as e:
        log.error("%s", e)
        return 2
    if args.healthcheck:
        return healthcheck(settings.http_port)
    try:
        repository = prepare(settings, facts=facts, builder=builder)
    except (CheckpointError, ConfigError) as e:
        log.error("%s", e)
        return 2
    except Stopped as e:
        log.warning("stopped by %s while preparing the repository; nothing half-built was kept", e)
        return 128 + e.signum
    except Exception:
        log.exception("building the repository failed")
        return 1
    if args.build_only:
        print(repository, flush=True)
        return 0
    try:
        with _stop_on_signals():  # until the supervisor's own handlers take over
            children = server_children(settings, repository)
    except FileNotFoundError as e:
        log.error("%s", e)
        return 2
    except Stopped as e:
        log.warning("stopped by %s before the servers started", e)
        return 128 + e.signum
    log.info("serving %s: gateway on port %d, Triton gRPC %d, metrics %d", repository, settings.http_port,
             settings.triton_grpc_port, settings.triton_metrics_port)
    return Supervisor(children, stop_timeout=settings.stop_timeout, reap=os.getpid() == 1).run()


if __name__ == "__main__":
    sys.exit(main())
