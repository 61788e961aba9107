"""The engine cache: `<cache>/<profile key>/repository`, reused when fresh, else built in a temporary folder
and published by rename, under a lock that lets replicas sharing a volume build each profile once."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

from ..contract import MODEL_NAME
from ..progress import log, step
from ..target import Target, detect_target
from .profile import checkpoint_fingerprint, code_fingerprint, profile_components, profile_key
from .settings import ONNX_DIR_TENSORRT, ConfigError, Settings

PROFILE_FILE = "profile.json"  # inside the repository: written last, before the rename that publishes it
LEFTOVER_PREFIXES = (".building-", ".stale-")


class Stopped(BaseException):
    """SIGTERM/SIGINT while preparing: unwinds through the build (BaseException: no `except Exception`
    in a builder swallows it) so that its temporary folder is removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def staleness(repository: Path, key: str, components: Mapping) -> str | None:
    """Why `repository` cannot be reused for this profile; None when it can."""
    if not repository.is_dir():
        return "none built yet"
    if not (repository / "build.json").is_file() or not (repository / MODEL_NAME / "config.pbtxt").is_file():
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


def work_folder(cache: Path, key: str) -> Path:
    """A profile's TensorRT work folder: ONNX exports, `fp8_scales.json`, the timing cache."""
    return Path(cache) / "work" / key


def build_for_runtime(checkpoint: Path, out: Path, *, runtime: str, precision: str,
                      onnx_dir: Path | None = None, work: Path | None = None, loras=(), guardrail=None) -> Path:
    """The one place that knows how each runtime's build is called. `work` (tensorrt): where the ONNX
    exports, the FP8 calibration and the timing cache go (`work_folder`), kept when a build fails."""
    from ..repository import build_repository

    if runtime == "tensorrt":
        if onnx_dir is not None:
            raise ConfigError(ONNX_DIR_TENSORRT)
        return build_repository(checkpoint, out, runtime="tensorrt", precision=precision,
                                work=work or Path(out).parent / "work", loras=loras, guardrail=guardrail)
    # ONNX Runtime is the CPU path for checks: float32 graphs whatever FLUX2_KLEIN_PRECISION says (it stays
    # in the profile key all the same).
    return build_repository(checkpoint, out, runtime="onnxruntime", onnx_dir=onnx_dir, loras=loras,
                            guardrail=guardrail)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
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


def prepare(settings: Settings, *, target: Target | None = None, builder: Callable[..., object] | None = None) -> Path:
    """Check the checkpoint, derive the profile, reuse or build its repository. `target`: the machine
    (default: detected); `builder`: what builds (default `build_for_runtime`)."""
    with stop_on_signals():
        return _prepare(settings, target, builder)


def _prepare(settings: Settings, target: Target | None, builder: Callable[..., object] | None) -> Path:
    from ..checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(settings.checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"{e} -- mount a FLUX.2 [klein] checkpoint (diffusers layout) at "
                              f"{settings.checkpoint} or point FLUX2_KLEIN_CHECKPOINT at one") from None
    log.info("checkpoint: %s is a FLUX.2 [klein] checkpoint", settings.checkpoint)
    target = target or detect_target()
    log.info("device: %s (compute capability %s), TensorRT %s, runtime %s, precision %s",
             target.gpu, target.compute_capability, target.tensorrt, settings.runtime, settings.precision)
    if settings.runtime == "tensorrt":
        if target.gpu == "cpu":
            raise ConfigError("FLUX2_KLEIN_RUNTIME=tensorrt needs an NVIDIA GPU and nvidia-smi shows none: give the "
                              "container one (docker run --gpus 1; Kubernetes nvidia.com/gpu: 1), or set "
                              "FLUX2_KLEIN_RUNTIME=onnxruntime for the CPU path")
        if target.tensorrt == "none":
            raise ConfigError("FLUX2_KLEIN_RUNTIME=tensorrt needs TensorRT's Python module (neither `tensorrt` "
                              "nor `tensorrt_bindings` imports); the image installs it matching the TensorRT "
                              "that Triton serves with")
    with step("checkpoint fingerprint"):
        checkpoint_hash = checkpoint_fingerprint(settings.checkpoint)
    components = profile_components(settings, target, checkpoint_hash, code_fingerprint())
    key = profile_key(components)
    log.info("profile: %s", key)
    builder = builder or build_for_runtime

    extra = {}
    if settings.loras:
        extra["loras"] = settings.loras
    if settings.guardrail is not None:
        extra["guardrail"] = settings.guardrail
    if settings.runtime == "tensorrt":
        # In the cache volume, keyed like the repository: a build that fails after an hour of export and
        # calibration resumes from them, and the timing cache persists. Kept after a build, whatever its end.
        extra["work"] = work_folder(settings.cache, key)

    def build(out: Path):
        return builder(settings.checkpoint, out, runtime=settings.runtime, precision=settings.precision,
                       onnx_dir=settings.onnx_dir, **extra)

    return ensure_repository(settings.cache, key, components, build, force=settings.rebuild)

