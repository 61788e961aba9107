"""The container's entrypoint (profile key, engine cache, supervision) and the deployment files.

No Docker engine and no cluster here: the entrypoint runs as a plain process with stand-in children,
and the Dockerfile, compose file and Kubernetes manifests are parsed and cross-checked against each
other and against what the entrypoint really accepts.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from flux2_klein.container.__main__ import main as entrypoint_main
from flux2_klein.container.cache import (
    LEFTOVER_PREFIXES, PROFILE_FILE, Stopped, ensure_repository, prepare,
)
from flux2_klein.container.profile import checkpoint_fingerprint, profile_components, profile_key
from flux2_klein.container.settings import ENV_VARS, ConfigError, Settings
from flux2_klein.container.supervisor import Child, Supervisor, server_children
from flux2_klein.server import free_port
from flux2_klein.target import Target, gpu_facts, tensorrt_version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
ENV_NAMES = {name for name, _, _ in ENV_VARS}


def _known_env(names) -> bool:
    """Ours, or the gateway's own FLUX2_KLEIN_GATEWAY_* settings (which reach it unchanged)."""
    return all(n in ENV_NAMES or n.startswith("FLUX2_KLEIN_GATEWAY_") for n in names)
H100 = Target(gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt="10.13.3.9")
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def light_ckpt(tiny_ckpt, tmp_path) -> Path:
    """The tiny checkpoint's configs and tokenizer without its weights: enough for load_checkpoint and
    fingerprints, and ours to modify."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


class FakeBuilder:
    """Writes the files a finished repository has, instantly; counts calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, checkpoint, out, *, runtime, precision, onnx_dir=None, work=None, loras=(), guardrail=None):
        self.calls.append({"checkpoint": checkpoint, "out": out, "runtime": runtime, "precision": precision,
                           "work": work, "loras": loras, "guardrail": guardrail})
        (out / "flux2_klein").mkdir(parents=True)
        (out / "flux2_klein" / "config.pbtxt").write_text('name: "flux2_klein"\n')
        (out / "build.json").write_text(json.dumps({"runtime": runtime}))
        return out


def _settings(ckpt: Path, cache: Path, **kw) -> Settings:
    return Settings(checkpoint=ckpt, cache=cache, runtime=kw.pop("runtime", "tensorrt"), **kw)


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.rglob(".*") if p.name.startswith(LEFTOVER_PREFIXES)]


# ------------------------------------------------------------------------------------------ profile key

def test_profile_key_is_stable_and_changes_with_every_component():
    settings = Settings(precision="fp8", runtime="tensorrt")
    base = profile_components(settings, H100, "c" * 64, "d" * 64)
    key = profile_key(base)
    assert key == profile_key(dict(base)) == profile_key(dict(reversed(list(base.items()))))
    assert re.fullmatch(r"tensorrt-fp8-sm90-[0-9a-f]{16}", key), key
    variants = {
        "gpu": "NVIDIA H200", "compute_capability": "10.0", "tensorrt": "10.14.1.48", "precision": "bf16",
        "runtime": "onnxruntime", "checkpoint": "e" * 64, "checkpoint_revision": "abc123", "code": "f" * 64,
        "schema": 2, "loras": "0123456789abcdef", "guardrail": {"prompt_check": False},
    }
    assert set(variants) == set(base), "every component is exercised"
    keys = {profile_key({**base, name: value}) for name, value in variants.items()}
    assert len(keys) == len(variants) and key not in keys
    assert profile_key(profile_components(settings, Target(gpu="cpu", compute_capability="none", tensorrt="none"), "c", "d")).startswith(
        "tensorrt-fp8-cpu-")


def test_checkpoint_fingerprint_reads_content_not_mtimes(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "transformer").mkdir(parents=True)
    (ckpt / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline"}')
    (ckpt / "transformer" / "config.json").write_text('{"in_channels": 128}')
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3 << 20], "data_offsets": [0, 6 << 20]}}).encode()
    weights = ckpt / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(len(header).to_bytes(8, "little") + header + bytes(6 << 20))
    first = checkpoint_fingerprint(ckpt)
    assert first == checkpoint_fingerprint(ckpt)

    os.utime(weights, (1, 1))  # a copy elsewhere has other mtimes: same profile, shared cache stays valid
    (ckpt / ".cache" / "huggingface").mkdir(parents=True)  # huggingface_hub's download metadata
    (ckpt / ".cache" / "huggingface" / "x.metadata").write_text(str(time.time()))
    assert checkpoint_fingerprint(ckpt) == first

    def patched(offset: int, data: bytes) -> str:
        original = weights.read_bytes()
        with open(weights, "r+b") as f:
            f.seek(offset)
            f.write(data)
        try:
            return checkpoint_fingerprint(ckpt)
        finally:
            weights.write_bytes(original)

    size = weights.stat().st_size
    assert patched(8 + len(header) + 10, b"\x01") != first  # first MiB of the weights
    assert patched(size - 10, b"\x01") != first  # last MiB
    # The documented blind spot (FLUX2_KLEIN_CHECKPOINT_REVISION covers it): the middle of a large file.
    assert patched(size // 2, b"\x01") == first
    (ckpt / "transformer" / "config.json").write_text('{"in_channels": 64}')
    assert checkpoint_fingerprint(ckpt) != first
    (ckpt / "transformer" / "config.json").write_text('{"in_channels": 128}')
    (ckpt / "transformer" / "extra.bin").write_bytes(b"")
    assert checkpoint_fingerprint(ckpt) != first  # names count


def test_gpu_facts_without_and_with_nvidia_smi(tmp_path):
    assert gpu_facts(None) == ("cpu", "none")
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\necho "NVIDIA H100 80GB HBM3, 9.0"\necho "NVIDIA H100 80GB HBM3, 9.0"\n')
    fake.chmod(0o755)
    assert gpu_facts(str(fake)) == ("NVIDIA H100 80GB HBM3", "9.0")
    broken = tmp_path / "broken-smi"
    broken.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    broken.chmod(0o755)
    assert gpu_facts(str(broken)) == ("cpu", "none")
    assert gpu_facts(str(tmp_path / "missing")) == ("cpu", "none")


def test_tensorrt_version_absent_and_present(monkeypatch):
    monkeypatch.delenv("FLUX2_KLEIN_TENSORRT", raising=False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    assert tensorrt_version() == "none"
    monkeypatch.setitem(sys.modules, "tensorrt", type(sys)("tensorrt"))
    sys.modules["tensorrt"].__version__ = "10.13.3.9"
    assert tensorrt_version() == "10.13.3.9"
    # Only the bindings wheel installed: its module counts (issue 12.1).
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", type(sys)("tensorrt_bindings"))
    sys.modules["tensorrt_bindings"].__version__ = "10.13.3.9"
    assert tensorrt_version() == "10.13.3.9"


def test_tensorrt_code_invalidates_the_cache_and_onnx_dir_is_refused_for_tensorrt(tmp_path):
    from flux2_klein.container.profile import code_files

    names = {rel for rel, _ in code_files()}
    assert {"flux2_klein/guardrail/repository.py", "flux2_klein/export/onnx_export.py",
            "flux2_klein/model_repository/sampler.py", "flux2_klein/configs/flux2-klein-4b.json",
            "flux2_klein/guardrail/blocklist.txt", "flux2_klein/export/calibration_prompts.txt"} <= names
    assert any("tensorrt" in n or "trt_" in n for n in names), "the TensorRT code is in the key"
    assert not any(n.startswith(("flux2_klein/client/", "flux2_klein/container/")) for n in names)
    with pytest.raises(ConfigError, match="FLUX2_KLEIN_ONNX_DIR.*onnxruntime"):
        Settings.from_env({"FLUX2_KLEIN_RUNTIME": "tensorrt", "FLUX2_KLEIN_ONNX_DIR": str(tmp_path)})
    assert Settings.from_env({"FLUX2_KLEIN_RUNTIME": "onnxruntime", "FLUX2_KLEIN_ONNX_DIR": str(tmp_path)}).onnx_dir


def _package_copy(dst: Path) -> Path:
    """The checkout's package folders (the raw layout: export/, client/, model_repository/ beside
    flux2_klein/), copied; its flux2_klein folder."""
    for name in ("flux2_klein", "export", "client", "model_repository"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst / "flux2_klein"


def test_a_change_in_any_module_that_builds_or_serves_changes_the_code_key(tmp_path):
    from flux2_klein.container.profile import code_fingerprint

    package = _package_copy(tmp_path)
    key = code_fingerprint(package)
    assert key == code_fingerprint(), "a copy of the same code has the same key"
    changed = ["guardrail/repository.py", "guardrail/blocklist.txt", "configs/flux2-klein-4b.json", "specs.py",
               "../export/onnx_export.py", "../export/calibration_prompts.txt", "../model_repository/preprocess.py"]
    for rel in changed:
        path = package / rel
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert code_fingerprint(package) != key, f"a change in {rel} left the key as it was"
        path.write_bytes(original)
    assert code_fingerprint(package) == key
    # A module added anywhere that builds (a new subfolder included) is in the key without anyone listing it.
    (package.parent / "export" / "newroom").mkdir()
    (package.parent / "export" / "newroom" / "__init__.py").write_text("")
    assert code_fingerprint(package) != key
    shutil.rmtree(package.parent / "export" / "newroom")
    # The gateway and the entrypoint neither write a repository nor run in Triton: no rebuild for them.
    for rel in ("../client/gateway/app.py", "container/settings.py"):
        (package / rel).write_text((package / rel).read_text() + "\n# changed\n")
    (package / "__pycache__").mkdir(exist_ok=True)
    (package / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    assert code_fingerprint(package) == key


def test_settings_from_env_defaults_and_errors():
    s = Settings.from_env({})
    assert (str(s.checkpoint), str(s.cache), s.precision, s.runtime) == ("/models/checkpoint", "/cache", "fp8", "tensorrt")
    assert (s.http_port, s.triton_grpc_port, s.triton_metrics_port) == (8000, 8001, 8002)
    assert Settings() == s, "the dataclass defaults and ENV_VARS agree"
    s = Settings.from_env({"FLUX2_KLEIN_PRECISION": "BF16", "FLUX2_KLEIN_RUNTIME": "onnxruntime", "FLUX2_KLEIN_REBUILD": "1",
                           "FLUX2_KLEIN_GATEWAY_ARGS": "--host 0.0.0.0", "FLUX2_KLEIN_API_KEY": "k"})
    assert (s.precision, s.runtime, s.rebuild, s.gateway_args, s.api_key) == (
        "bf16", "onnxruntime", True, ("--host", "0.0.0.0"), "k")
    for env, words in [({"FLUX2_KLEIN_PRECISION": "int4"}, "fp8, bf16"), ({"FLUX2_KLEIN_RUNTIME": "tvm"}, "tensorrt"),
                       ({"FLUX2_KLEIN_GATEWAY_PORT": "http"}, "port number"), ({"FLUX2_KLEIN_GATEWAY_PORT": "8001"}, "must all differ"),
                       ({"FLUX2_KLEIN_STOP_TIMEOUT": "soon"}, "seconds"),
                       ({"FLUX2_KLEIN_LORA_LIBRARY": "/loras"}, "LORA_LIBRARY: .*torch runtime only.*FLUX2_KLEIN_LORAS")]:
        with pytest.raises(ConfigError, match=words):
            Settings.from_env(env)


# ------------------------------------------------------------------------------------------ engine cache

def test_build_when_missing_then_reuse_without_rebuilding(light_ckpt, tmp_path):
    builder, cache = FakeBuilder(), tmp_path / "cache"
    repo = prepare(_settings(light_ckpt, cache), target=H100, builder=builder)
    assert len(builder.calls) == 1 and builder.calls[0]["precision"] == "fp8"
    assert repo.parent.parent == cache and repo.name == "repository"
    meta = json.loads((repo / PROFILE_FILE).read_text())
    assert meta["key"] == repo.parent.name and meta["components"]["gpu"] == H100.gpu
    assert not _leftovers(cache)
    marker = (repo / PROFILE_FILE).stat().st_mtime_ns

    again = prepare(_settings(light_ckpt, cache), target=H100, builder=builder)
    assert again == repo and len(builder.calls) == 1, "a fresh repository is reused"
    assert (repo / PROFILE_FILE).stat().st_mtime_ns == marker

    forced = prepare(_settings(light_ckpt, cache, rebuild=True), target=H100, builder=builder)
    assert forced == repo and len(builder.calls) == 2 and not _leftovers(cache)


def test_rebuild_when_precision_gpu_or_checkpoint_config_changes(light_ckpt, tmp_path):
    builder, cache = FakeBuilder(), tmp_path / "cache"
    fp8 = prepare(_settings(light_ckpt, cache), target=H100, builder=builder)
    bf16 = prepare(_settings(light_ckpt, cache, precision="bf16"), target=H100, builder=builder)
    assert bf16 != fp8 and [c["precision"] for c in builder.calls] == ["fp8", "bf16"]
    h200 = prepare(_settings(light_ckpt, cache), target=Target(gpu="NVIDIA H200", compute_capability="9.0", tensorrt="10.13.3.9"), builder=builder)
    assert h200 not in (fp8, bf16) and len(builder.calls) == 3

    config = light_ckpt / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "shift": 7.0}))
    changed = prepare(_settings(light_ckpt, cache), target=H100, builder=builder)
    assert changed not in (fp8, bf16, h200) and len(builder.calls) == 4
    assert prepare(_settings(light_ckpt, cache), target=H100, builder=builder) == changed
    assert len(builder.calls) == 4


def test_rebuild_when_the_cached_repository_is_stale_or_incomplete(light_ckpt, tmp_path):
    builder, cache = FakeBuilder(), tmp_path / "cache"
    repo = prepare(_settings(light_ckpt, cache), target=H100, builder=builder)

    meta = json.loads((repo / PROFILE_FILE).read_text())
    meta["components"]["tensorrt"] = "10.0.0"  # e.g. written by another version of this code
    (repo / PROFILE_FILE).write_text(json.dumps(meta))
    assert prepare(_settings(light_ckpt, cache), target=H100, builder=builder) == repo
    assert len(builder.calls) == 2 and json.loads((repo / PROFILE_FILE).read_text())["components"]["tensorrt"] == H100.tensorrt

    (repo / "build.json").unlink()  # incomplete: e.g. copied in by hand, half
    prepare(_settings(light_ckpt, cache), target=H100, builder=builder)
    assert len(builder.calls) == 3 and (repo / "build.json").is_file()

    (repo / PROFILE_FILE).write_text("{not json")
    prepare(_settings(light_ckpt, cache), target=H100, builder=builder)
    assert len(builder.calls) == 4 and not _leftovers(cache)


def test_an_interrupted_build_is_discarded_and_rebuilt(light_ckpt, tmp_path):
    builder, cache = FakeBuilder(), tmp_path / "cache"

    def killed_midway(checkpoint, out, **kw):
        (out / "transformer" / "1").mkdir(parents=True)
        (out / "transformer" / "1" / "model.plan").write_bytes(b"half an engine")
        os.kill(os.getpid(), signal.SIGTERM)  # `docker stop` midway: the handler raises Stopped
        time.sleep(10)
        raise AssertionError("SIGTERM did not interrupt the build")

    with pytest.raises(Stopped) as stopped:
        prepare(_settings(light_ckpt, cache), target=H100, builder=killed_midway)
    assert stopped.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "handlers restored"
    assert not any(cache.rglob("repository")), "nothing half-built is published"
    assert not _leftovers(cache), "the temporary folder is removed on the way out"

    def crashed(checkpoint, out, **kw):
        (out / "flux2_klein").mkdir(parents=True)
        kw["work"].mkdir(parents=True)
        (kw["work"] / "fp8_scales.json").write_text("{}")  # an hour of export and calibration, done
        raise RuntimeError("out of GPU memory")

    with pytest.raises(RuntimeError):
        prepare(_settings(light_ckpt, cache), target=H100, builder=crashed)
    assert not any(cache.rglob("repository")) and not _leftovers(cache)
    (work,) = (cache / "work").iterdir()
    assert (work / "fp8_scales.json").is_file(), "a failed build keeps its exports in the cache volume"

    # A SIGKILL (or power cut) leaves a temporary folder behind; the next start removes it and builds.
    (home,) = [p for p in cache.iterdir() if p.is_dir() and p.name != "work"]
    partial = home / ".building-dead" / "repository"
    (partial / "flux2_klein").mkdir(parents=True)
    (partial / "build.json").write_text("{}")
    repo = prepare(_settings(light_ckpt, cache), target=H100, builder=builder)
    assert len(builder.calls) == 1 and repo == home / "repository"
    assert not (home / ".building-dead").exists() and not _leftovers(cache)
    assert builder.calls[0]["work"] == work == cache / "work" / home.name, "the next build resumes from it"


def test_tensorrt_runtime_without_a_gpu_or_tensorrt_is_a_clear_error(light_ckpt, tmp_path):
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU.*FLUX2_KLEIN_RUNTIME=onnxruntime"):
        prepare(_settings(light_ckpt, tmp_path), target=Target(gpu="cpu", compute_capability="none", tensorrt="none"), builder=FakeBuilder())
    with pytest.raises(ConfigError, match="neither `tensorrt` nor `tensorrt_bindings` imports"):
        prepare(_settings(light_ckpt, tmp_path), target=Target(gpu="NVIDIA H100", compute_capability="9.0", tensorrt="none"), builder=FakeBuilder())


def test_unwritable_cache_is_a_clear_error(light_ckpt, tmp_path):
    if os.getuid() == 0:
        cache = Path("/proc/flux2-cache")  # not even root can write here
    else:
        cache = tmp_path / "ro"
        cache.mkdir(mode=0o555)
    with pytest.raises(ConfigError, match="FLUX2_KLEIN_CACHE: cannot write"):
        ensure_repository(cache, "k", {}, lambda out: None)


def _run_entrypoint(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flux2_klein.entrypoint", *args], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("damage", ["missing", "empty", "wrong-pipeline", "no-transformer"])
def test_bad_checkpoint_mount_exits_2_and_says_why(damage, light_ckpt, tmp_path):
    ckpt = light_ckpt
    expected = {"missing": "is not a directory", "empty": "missing", "wrong-pipeline": "StableDiffusionPipeline",
                "no-transformer": "transformer"}[damage]
    if damage == "missing":
        ckpt = tmp_path / "not-mounted"
    elif damage == "empty":
        ckpt = tmp_path / "empty"
        ckpt.mkdir()
    elif damage == "wrong-pipeline":
        index = json.loads((ckpt / "model_index.json").read_text())
        (ckpt / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    else:
        shutil.rmtree(ckpt / "transformer")
    r = _run_entrypoint({"FLUX2_KLEIN_CHECKPOINT": str(ckpt), "FLUX2_KLEIN_CACHE": str(tmp_path / "cache")}, "--build-only")
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and str(ckpt) in r.stderr and "FLUX2_KLEIN_CHECKPOINT" in r.stderr, r.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_bad_setting_exits_2_and_names_it(tmp_path):
    r = _run_entrypoint({"FLUX2_KLEIN_PRECISION": "int4"}, "--build-only")
    assert r.returncode == 2 and "FLUX2_KLEIN_PRECISION" in r.stderr and "fp8, bf16" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------------- supervision

def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_dying_child_stops_the_other_with_its_status():
    children = [Child("tritonserver", SLEEPER),
                Child("gateway", [sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit(3)"])]
    start = time.monotonic()
    assert Supervisor(children, stop_timeout=10, poll_s=0.05).run() == 3
    assert time.monotonic() - start < 10
    assert children[0].process.returncode == -signal.SIGTERM, "stopped with SIGTERM, not killed"
    assert _gone(children[0].process.pid)

    killed = [Child("tritonserver", [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]),
              Child("gateway", SLEEPER)]
    assert Supervisor(killed, stop_timeout=10, poll_s=0.05).run() == 128 + signal.SIGKILL
    clean_exit = [Child("tritonserver", [sys.executable, "-c", "pass"]), Child("gateway", SLEEPER)]
    assert Supervisor(clean_exit, stop_timeout=10, poll_s=0.05).run() == 1, "an unexpected exit 0 is a failure"


def test_sigint_stops_both_children_and_exits_0():
    children = [Child("tritonserver", SLEEPER), Child("gateway", SLEEPER)]
    sup = Supervisor(children, stop_timeout=10, poll_s=0.05)

    def interrupt_when_started():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(c.process for c in children):
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=interrupt_when_started, daemon=True)
    t.start()
    assert sup.run() == 0
    t.join()
    assert all(c.process.returncode == -signal.SIGTERM and _gone(c.process.pid) for c in children)
    assert signal.getsignal(signal.SIGINT) is not sup._on_signal, "handlers restored"


def test_a_child_ignoring_sigterm_is_killed_after_the_stop_timeout():
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]
    children = [Child("tritonserver", stubborn),
                Child("gateway", [sys.executable, "-c", "import sys, time; time.sleep(1.5); sys.exit(4)"])]
    start = time.monotonic()
    assert Supervisor(children, stop_timeout=1, poll_s=0.05).run() == 4
    assert children[0].process.returncode == -signal.SIGKILL and time.monotonic() - start < 10


def test_the_pid1_reaper_records_our_childrens_status():
    child = Child("gateway", [sys.executable, "-c", "import sys; sys.exit(7)"])
    sup = Supervisor([child], reap=True)
    child.process = subprocess.Popen(child.argv)
    deadline = time.monotonic() + 20
    while child.process.returncode is None and time.monotonic() < deadline:
        sup._reap()  # os.waitpid(-1): as PID 1 it also collects orphans re-parented to us
        time.sleep(0.05)
    assert child.process.returncode == 7 and child.process.poll() == 7


def test_server_children_commands_and_environments(tmp_path, monkeypatch):
    monkeypatch.setenv("FLUX2_KLEIN_API_KEY", "secret")
    settings = Settings.from_env({"FLUX2_KLEIN_API_KEY": "secret", "FLUX2_KLEIN_GATEWAY_ARGS": "--max-concurrency 2",
                                  "FLUX2_KLEIN_TRITON_COMMAND": "sleep 1"})
    triton, gateway = server_children(settings, tmp_path / "repo")
    assert triton.argv == ["sleep", "1"] and triton.env["FLUX2_KLEIN_REPOSITORY"] == str(tmp_path / "repo")
    assert "FLUX2_KLEIN_API_KEY" not in triton.env, "the key reaches the gateway only"
    assert gateway.env["FLUX2_KLEIN_API_KEY"] == "secret"
    assert gateway.argv[1:] == ["-m", "flux2_klein.cli", "gateway", "--port", "8000",
                                "--triton-url", "127.0.0.1:8001", "--max-concurrency", "2"]
    assert gateway.ready_url.endswith(":8000/v1/health/ready") and triton.ready_url.endswith(":8003/v2/health/ready")

    # The real tritonserver command (the nvidia-pytriton build on this machine).
    triton, _ = server_children(Settings.from_env({}), tmp_path / "repo")
    assert f"--model-repository={tmp_path / 'repo'}" in triton.argv
    assert {"--http-port=8003", "--grpc-port=8001", "--metrics-port=8002", "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1"} <= set(triton.argv)
    # Metrics where the PodMonitor and the autoscaler scrape them (issue 11.6); the admin APIs keyed.
    assert "--metrics-address=0.0.0.0" in triton.argv and triton.restartable and triton.drain is not None
    assert any(a.startswith("--http-restricted-api=shared-memory,model-repository,trace,logging:")
               for a in triton.argv)


def test_healthcheck_asks_the_gateway(monkeypatch):
    class Ready(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v1/health/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Ready)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FLUX2_KLEIN_GATEWAY_PORT", str(server.server_port))
        assert entrypoint_main(["--healthcheck"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert entrypoint_main(["--healthcheck"]) == 1, "nobody listens any more"


# The real build: the entrypoint as the container runs it, on the tiny checkpoint with ONNX Runtime.
STAND_IN = """
import os, sys, time
path = sys.argv[1]
with open(path + ".tmp", "w") as f:
    json_line = " ".join([str(os.getpid()), os.environ.get("FLUX2_KLEIN_REPOSITORY", "-"), os.environ.get("FLUX2_KLEIN_API_KEY", "-")])
    f.write(json_line)
os.rename(path + ".tmp", path)
time.sleep(120)
"""


@pytest.mark.slow
def test_entrypoint_builds_reuses_serves_and_stops_on_sigterm(tiny_ckpt, onnx_dir, tmp_path):
    cache = tmp_path / "cache"
    env = {"FLUX2_KLEIN_CHECKPOINT": str(tiny_ckpt), "FLUX2_KLEIN_CACHE": str(cache), "FLUX2_KLEIN_RUNTIME": "onnxruntime",
           "FLUX2_KLEIN_ONNX_DIR": str(onnx_dir), "FLUX2_KLEIN_API_KEY": "secret"}
    r = _run_entrypoint(env, "--build-only", timeout=300)
    assert r.returncode == 0, r.stderr
    repo = Path(r.stdout.strip().splitlines()[-1])
    assert "engine cache: building" in r.stderr and "profile: onnxruntime-fp8-" in r.stderr
    assert (repo / "flux2_klein" / "config.pbtxt").is_file() and (repo / "transformer" / "1" / "model.onnx").is_file()
    build = json.loads((repo / "build.json").read_text())
    assert build["runtime"] == "onnxruntime"
    meta = json.loads((repo / PROFILE_FILE).read_text())
    assert meta["key"] == repo.parent.name and meta["components"]["runtime"] == "onnxruntime"
    marker = (repo / PROFILE_FILE).stat().st_mtime_ns

    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    pids = {name: tmp_path / f"{name}.pid" for name in ("triton", "gateway")}
    env |= {"FLUX2_KLEIN_TRITON_COMMAND": f"{sys.executable} {script} {pids['triton']}",
            "FLUX2_KLEIN_GATEWAY_COMMAND": f"{sys.executable} {script} {pids['gateway']}", "FLUX2_KLEIN_STOP_TIMEOUT": "10"}
    log_path = tmp_path / "entrypoint.log"
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "flux2_klein.entrypoint"], cwd=ROOT, env={**os.environ, **env},
                             stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not all(f.exists() for f in pids.values()):
                assert p.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            seen = {name: f.read_text().split() for name, f in pids.items()}
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=30) == 0, log_path.read_text()
        finally:
            if p.poll() is None:
                p.kill()
    text = log_path.read_text()
    assert "engine cache: reusing" in text and "engine cache: building" not in text
    assert (repo / PROFILE_FILE).stat().st_mtime_ns == marker, "a fresh repository is not rebuilt"
    assert seen["triton"][1] == seen["gateway"][1] == str(repo)
    assert (seen["triton"][2], seen["gateway"][2]) == ("-", "secret")
    assert all(_gone(int(s[0])) for s in seen.values()), "both children stopped"
    assert "SIGTERM received" in text


# ------------------------------------------------------------------------------------- deployment files

def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_pinned_non_root_and_runs_what_exists(capsys):
    ins = _dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", froms[0]), froms
    assert "latest" not in froms[0]
    (user,) = [rest for word, rest in ins if word == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert [rest for word, rest in ins if word == "EXPOSE"] == ["8000"]

    (health,) = [rest for word, rest in ins if word == "HEALTHCHECK"]
    health_cmd = json.loads(health.split(" CMD ", 1)[1])
    assert health_cmd == ["python3", "-m", "flux2_klein.entrypoint", "--healthcheck"]
    start_period = re.search(r"--start-period=(\d+)m", health)
    assert start_period and int(start_period.group(1)) >= 30, "the first engine build fits in start-period"
    (entry,) = [json.loads(rest) for word, rest in ins if word == "ENTRYPOINT"]
    assert entry[-3:] == ["python3", "-m", "flux2_klein.entrypoint"]
    assert (ROOT / "flux2_klein" / "entrypoint.py").is_file()
    with pytest.raises(SystemExit) as e:
        entrypoint_main(["--help"])
    assert e.value.code == 0 and "--healthcheck" in capsys.readouterr().out

    # Every COPY source exists and passes the build context's allow-list; pip installs the project.
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()
    for word, rest in ins:
        if word == "COPY":
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), src
                assert f"!{src}" in ignore, f"{src} is excluded from the build context"
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    # The project from src/, never from the working directory (issue 19.1; tests/test_docker_replay.py runs it).
    assert "pip install --no-deps ./src" in runs and "nvidia-pytriton" in runs and "tensorrt" in runs
    env_names = set(re.findall(r"\b(FLUX2_[A-Z_]+)=", " ".join(rest for word, rest in ins if word == "ENV")))
    assert env_names and _known_env(env_names)
    assert f"{uid}:" in runs and "/cache" in runs, "the non-root user owns the cache mount point"


def _docker_runs(text: str) -> list[list[str]]:
    """The `docker run` command lines in `text` (continuations joined; a shell comment's `#` prefix, as in a
    script's header, dropped), as words."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [shlex.split(line[line.index("docker run"):]) for line in joined.splitlines() if "docker run " in line]


def _uid_owned_dirs() -> tuple[str, set[str]]:
    """The image's USER uid, and the folders its RUN lines `chown` to that uid."""
    ins = _dockerfile_instructions()
    uid = next(rest for word, rest in ins if word == "USER").split(":")[0]
    owned = set()
    for word, rest in ins:
        if word == "RUN":
            for m in re.finditer(rf"chown (?:-R )?{uid}(?::\d+)? ([^&;|]+)", rest):
                owned |= set(m.group(1).split())
    return uid, owned


def test_documented_docker_runs_use_ngc_entrypoint_and_mount_volumes_where_the_user_can_write():
    """Issue 19.2: README's runs of the image (and bench/h100_tensorrt.sh's own header) go through NGC's
    entrypoint when they replace ours, and mount named volumes only where the image's user owns the mount
    point (a new volume takes that owner; anywhere else it is root's and the uid-10001 user cannot write)."""
    (entry,) = [json.loads(rest) for word, rest in _dockerfile_instructions() if word == "ENTRYPOINT"]
    uid, owned = _uid_owned_dirs()
    assert "/cache" in owned
    runs = _docker_runs((ROOT / "README.md").read_text()) + _docker_runs((ROOT / "bench" / "h100_tensorrt.sh").read_text())
    assert any("h100_tensorrt.sh" in " ".join(r) for r in runs), "README shows how to run the TensorRT check"
    for words in runs:
        where = " ".join(words)
        if "--entrypoint" in words:
            assert words[words.index("--entrypoint") + 1] == entry[0], f"skips NGC's entrypoint: {where}"
        if "--user" in words or "-u" in words:
            continue  # another user: its own business
        for i, w in enumerate(words):
            if w in ("-v", "--volume"):
                source, target = words[i + 1].split(":")[:2]
                if not source.startswith(("/", ".", "$", "~")):  # a named volume
                    assert target in owned, f"named volume {source} at {target}, not owned by uid {uid}: {where}"


def test_compose_reserves_a_gpu_shm_volumes_port_and_healthcheck():
    doc = yaml.safe_load(COMPOSE.read_text())
    (svc,) = doc["services"].values()
    assert "8000:8000" in svc["ports"]
    assert re.fullmatch(r"\d+(gb|g)", str(svc["shm_size"]).lower())
    (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert mounts["/models/checkpoint"]["read_only"] is True and mounts["/models/checkpoint"]["type"] == "bind"
    assert mounts["/cache"]["type"] == "volume" and mounts["/cache"]["source"] in doc["volumes"]
    assert svc["healthcheck"]["test"][-3:] == ["-m", "flux2_klein.entrypoint", "--healthcheck"]
    assert _known_env(svc["environment"])
    build = svc["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def _k8s_docs() -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def test_k8s_manifests_fit_together():
    kinds = _k8s_docs()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert all((K8S / r).is_file() for r in kustomization["resources"])

    (deploy,) = kinds["Deployment"]
    pod = deploy["spec"]["template"]
    assert deploy["spec"]["replicas"] >= 1
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    assert c["image"].split(":")[0] in {i["name"] for i in kustomization["images"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "metrics": 8002}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1

    def probe(name):
        get = c[name]["httpGet"]
        return get["path"], ports.get(get["port"], get["port"])

    assert probe("readinessProbe") == ("/v1/health/ready", 8000)
    assert probe("livenessProbe") == ("/v1/health/live", 8000)
    assert probe("startupProbe")[1] == 8000
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600, "room for a first engine build"

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/models/checkpoint"]["readOnly"] is True
    claims = {p["metadata"]["name"]: p for p in kinds["PersistentVolumeClaim"]}
    cache_claim = volumes[mounts["/cache"]["name"]]["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in claims[cache_claim]["spec"]["accessModes"]
    assert volumes[mounts["/models/checkpoint"]["name"]]["persistentVolumeClaim"]["claimName"] in claims

    env = {e["name"]: e for e in c["env"]}
    assert _known_env(env)
    assert env["FLUX2_KLEIN_CACHE"]["value"] == "/cache" and env["FLUX2_KLEIN_CHECKPOINT"]["value"] == "/models/checkpoint"
    assert env["FLUX2_KLEIN_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
    security = pod["spec"]["securityContext"]
    uid = next(rest for word, rest in _dockerfile_instructions() if word == "USER").split(":")[0]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == int(uid) and "fsGroup" in security
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["FLUX2_KLEIN_STOP_TIMEOUT"]["value"])

    (svc,) = kinds["Service"]
    (sport,) = svc["spec"]["ports"]
    assert sport["port"] == 8000 and ports[sport["targetPort"]] == 8000
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()

    # Metrics: Triton's port scraped (PodMonitor and annotations), the adapter's rule feeds the HPA.
    (monitor,) = kinds["PodMonitor"]
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    adapter = next(m for m in kinds["ConfigMap"] if "config.yaml" in m.get("data", {}))
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"] and "nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


FLAKY_TRITON = """
import http.server, os, sys, threading, time
starts = sys.argv[1]
with open(starts, "a") as f:
    f.write("start\\n")
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[2])), Ready)
server.allow_reuse_address = True
threading.Thread(target=server.serve_forever, daemon=True).start()
time.sleep(3 if open(starts).read().count("start") == 1 else 60)  # the first one dies once ready
os._exit(9)
"""


def test_tritonserver_dying_after_ready_is_restarted_within_a_budget(tmp_path):
    """Issue 11.1: a tritonserver that dies once ready is started again (bounded, logged), not fatal."""
    from flux2_klein.watchdog import RestartBudget

    script, starts, port = tmp_path / "flaky.py", tmp_path / "starts", free_port()
    script.write_text(FLAKY_TRITON)
    triton = Child("tritonserver", [sys.executable, str(script), str(starts), str(port)],
                   ready_url=f"http://127.0.0.1:{port}/", restartable=True)
    children = [triton, Child("gateway", SLEEPER)]
    sup = Supervisor(children, stop_timeout=10, poll_s=0.05, budget=RestartBudget(limit=3, window_s=60))

    def interrupt_after_restart():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (starts.exists() and starts.read_text().count("start") >= 2):
            time.sleep(0.05)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=interrupt_after_restart, daemon=True)
    t.start()
    assert sup.run() == 0, "restarted, then stopped on request"
    t.join()
    assert starts.read_text().count("start") == 2 and len(sup.budget.times) == 1


SHM_TRITON = """
import http.server, mmap, os, sys, threading, time, uuid
names, port = sys.argv[1], int(sys.argv[2])
first = not os.path.exists(names)

def region():  # what a Python-backend stub's region is: the real prefix, a UUID, mapped and written
    name = "triton_python_backend_shm_region_" + str(uuid.uuid4())
    with open(names, "a") as f:
        f.write(name + "\\n")
    fd = os.open("/dev/shm/" + name, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 1 << 20)
    return mmap.mmap(fd, 1 << 20)

mine = region()
if os.fork() == 0:  # a "stub" in the server's process group, with a region of its own
    stub = region()
    while True:
        stub[0:8] = os.urandom(8); time.sleep(0.05)
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Ready)
threading.Thread(target=server.serve_forever, daemon=True).start()
deadline = time.monotonic() + (2 if first else 600)
while time.monotonic() < deadline:  # written until it dies: a fresh mtime, as a region in use has
    mine[0:8] = os.urandom(8); time.sleep(0.05)
os._exit(9)  # dies as a killed tritonserver does: removing nothing
"""


def test_dev_shm_is_left_as_found_after_a_restart_and_a_stop(tmp_path):
    """Issue 19.9: the regions of a tritonserver that died (and of its stubs) go at the restart, whatever their
    age, and those of the last one when the supervisor stops, even when it had to be killed."""
    from flux2_klein.watchdog import RestartBudget, SHM_DIR, shm_regions

    before = shm_regions()
    script, names, port = tmp_path / "shm_triton.py", tmp_path / "regions", free_port()
    script.write_text(SHM_TRITON)
    triton = Child("tritonserver", [sys.executable, str(script), str(names), str(port)],
                   ready_url=f"http://127.0.0.1:{port}/", restartable=True)
    sup = Supervisor([triton, Child("gateway", SLEEPER)], stop_timeout=2, poll_s=0.05,
                     budget=RestartBudget(limit=3, window_s=60))

    def stop_after_restart():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (names.exists() and len(names.read_text().split()) >= 4):
            time.sleep(0.05)
        first = names.read_text().split()[:2]  # the first server's and its stub's, written until it died
        at_restart.extend(n for n in first if (SHM_DIR / n).exists())
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)  # the stand-in ignores nothing but removes nothing either

    at_restart: list[str] = []
    t = threading.Thread(target=stop_after_restart, daemon=True)
    t.start()
    try:
        assert sup.run() == 0
    finally:
        t.join()
        ours = names.read_text().split() if names.exists() else []
        left = [n for n in ours if (SHM_DIR / n).exists()]
        for n in left:
            (SHM_DIR / n).unlink()
    assert len(ours) == 4 and len(sup.budget.times) == 1, "two servers, each with a stub, one restart"
    assert not at_restart, f"the dead server's regions outlived its restart: {at_restart}"
    assert not left, f"{len(left)} of our {len(ours)} /dev/shm regions stayed: {left}"
    assert not (set(ours) & (shm_regions() - before))


def test_serve_leaves_dev_shm_as_found_after_a_restart_and_sigterm(tmp_path):
    """The same for `flux2-klein serve`, whose SIGTERM came while the restarted server was still starting
    (its stubs not yet watched): it is stopped after a short wait, killed, and its regions still go."""
    from flux2_klein.watchdog import SHM_DIR

    script, names = tmp_path / "shm_triton.py", tmp_path / "regions"
    # The stand-in takes tritonserver's command line: the names file and --http-port=N.
    script.write_text("import sys\nport = next(a.split('=')[1] for a in sys.argv if a.startswith('--http-port='))\n"
                      f"sys.argv = [sys.argv[0], {str(names)!r}, port]\n" + SHM_TRITON)
    wrapper = tmp_path / "tritonserver"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    wrapper.chmod(0o755)
    repo = tmp_path / "repo"
    (repo / "flux2_klein").mkdir(parents=True)
    (repo / "flux2_klein" / "config.pbtxt").write_text('name: "flux2_klein"\n')
    proc = subprocess.Popen([sys.executable, "-m", "flux2_klein.cli", "serve", "--repository", str(repo),
                             "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                             "--metrics-port", str(free_port())], env={**os.environ, "TRITONSERVER": str(wrapper)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (names.exists() and len(names.read_text().split()) >= 4):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the second server has just made its regions; not yet ready
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        ours = names.read_text().split() if names.exists() else []
        left = [n for n in ours if (SHM_DIR / n).exists()]
        for n in left:
            (SHM_DIR / n).unlink()
    assert proc.returncode == 0, out[-3000:]
    assert len(ours) == 4 and "restarting tritonserver" in out, out[-3000:]
    assert not left, f"{len(left)} of our {len(ours)} /dev/shm regions stayed: {left}\n{out[-2000:]}"


def test_loras_and_the_guardrail_are_settings_and_part_of_the_profile_key(light_ckpt, tmp_path):
    from flux2_klein.container.profile import profile_components, profile_key

    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"not really a LoRA, but bytes to fingerprint")
    plain = Settings.from_env({"FLUX2_KLEIN_CHECKPOINT": str(light_ckpt)})
    styled = Settings.from_env({"FLUX2_KLEIN_CHECKPOINT": str(light_ckpt), "FLUX2_KLEIN_LORAS": f"{lora}:0.5"})
    assert [(str(x.path), x.scale) for x in styled.loras] == [(str(lora), 0.5)]
    strict = tmp_path / "guardrail.toml"
    strict.write_text("prompt_check = true\nblocklists = [\"default\"]\naudit_prompt = false\n"
                      "allow_disable_safety_checker = true\n")
    guarded = Settings.from_env({"FLUX2_KLEIN_CHECKPOINT": str(light_ckpt), "FLUX2_KLEIN_GUARDRAIL": str(strict)})
    assert guarded.guardrail.allow_disable_safety_checker and not plain.guardrail.allow_disable_safety_checker
    keys = {profile_key(profile_components(s, H100, "ckpt", "code")) for s in (plain, styled, guarded)}
    assert len(keys) == 3
    for env, words in [({"FLUX2_KLEIN_LORAS": str(tmp_path / "missing.safetensors")}, "FLUX2_KLEIN_LORAS"),
                       ({"FLUX2_KLEIN_LORAS": f"{lora}:lots"}, "FLUX2_KLEIN_LORAS"),
                       ({"FLUX2_KLEIN_GUARDRAIL": str(tmp_path / "none.toml")}, "guardrail")]:
        with pytest.raises(ConfigError, match=words):
            Settings.from_env(env)


@pytest.mark.slow
def test_entrypoint_for_real_waits_on_a_shared_cache_then_serves_through_triton_and_the_gateway(tiny_ckpt, onnx_dir,
                                                                                                  tmp_path):
    """The container's entrypoint with nothing stood in (issue 16.5): a second replica waits on the cache's
    lock while another builds, then the real tritonserver and the real gateway serve an image, and SIGTERM
    stops both. ONNX Runtime on the tiny checkpoint; loopback only."""
    import fcntl

    from flux2_klein.server import free_port
    from test_gateway import http_request

    cache = tmp_path / "cache"
    env = {"FLUX2_KLEIN_CHECKPOINT": str(tiny_ckpt), "FLUX2_KLEIN_CACHE": str(cache), "FLUX2_KLEIN_RUNTIME": "onnxruntime",
           "FLUX2_KLEIN_ONNX_DIR": str(onnx_dir), "FLUX2_KLEIN_API_KEY": "real-secret-key-0123"}
    r = _run_entrypoint(env, "--build-only", timeout=300)
    assert r.returncode == 0, r.stderr
    repo = Path(r.stdout.strip().splitlines()[-1])

    # Another replica holds the profile's lock (as while building): this one waits, then builds.
    log_path = tmp_path / "second.log"
    with open(repo.parent / ".lock", "a+") as held, open(log_path, "w") as log:
        fcntl.flock(held, fcntl.LOCK_EX)
        second = subprocess.Popen([sys.executable, "-m", "flux2_klein.entrypoint", "--build-only"], cwd=ROOT,
                                  env={**os.environ, **env, "FLUX2_KLEIN_REBUILD": "1"}, stdout=log,
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while "waiting for it" not in log_path.read_text():
            assert second.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        time.sleep(1)
        assert second.poll() is None, "it must not build while the lock is held"
        fcntl.flock(held, fcntl.LOCK_UN)
    assert second.wait(timeout=300) == 0, log_path.read_text()
    assert "engine cache: building" in log_path.read_text()

    ports = {name: str(free_port()) for name in ("GATEWAY_PORT", "TRITON_GRPC_PORT", "TRITON_HTTP_PORT",
                                                 "TRITON_METRICS_PORT")}
    env |= {f"FLUX2_KLEIN_{k}": v for k, v in ports.items()} | {"FLUX2_KLEIN_GATEWAY_HOST": "127.0.0.1"}
    log_path = tmp_path / "entrypoint.log"
    with open(log_path, "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "flux2_klein.entrypoint"], cwd=ROOT, env={**os.environ, **env},
                             stdout=log, stderr=subprocess.STDOUT)
        try:
            port = int(ports["GATEWAY_PORT"])
            deadline = time.monotonic() + 420
            while True:
                assert p.poll() is None and time.monotonic() < deadline, log_path.read_text()[-5000:]
                try:
                    if http_request(port, "GET", "/v1/health/ready", timeout=5).status == 200:
                        break
                except OSError:
                    pass
                time.sleep(1)
            answer = http_request(port, "POST", "/v1/infer", {"prompt": "a lighthouse", "seed": 3},
                                  {"Authorization": "Bearer real-secret-key-0123"}, timeout=300)
            assert answer.status == 200, answer
            (artifact,) = answer.json()["artifacts"]
            assert artifact["finishReason"] == "SUCCESS" and artifact["seed"] == 3
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=120) == 0, log_path.read_text()[-5000:]
        finally:
            if p.poll() is None:
                p.kill()
    text = log_path.read_text()
    assert "engine cache: reusing" in text
    with pytest.raises(OSError):  # both children are gone with it
        http_request(port, "GET", "/v1/health/live", timeout=2)
