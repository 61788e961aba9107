"""Shared fixtures: one tiny checkpoint of each kind per test session, made once and reused."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Two CPU cores in CI: let torch and ONNX Runtime use both without oversubscribing (set before numpy loads).
os.environ.setdefault("OMP_NUM_THREADS", "2")

from flux2_klein.server import TritonProcess, free_port  # noqa: E402,F401 - free_port: the tests' one


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


# A LoRA library for the tiny checkpoint (flux2_klein/lora_library.py): name -> (seed, targeted layers).
LORA_LIBRARY = {"style": (1, ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")), "detail": (2, ("to_v",)),
                "ink.v2": (3, ("to_q", "to_out.0"))}


@pytest.fixture(scope="session")
def lora_folder(tiny_ckpt, tmp_path_factory) -> Path:
    """A folder of LORA_LIBRARY's files, `<name>.safetensors` each (tests/test_lora.py's make_lora)."""
    from test_lora import make_lora

    root = tmp_path_factory.mktemp("lora-library")
    folder = root / "library"
    folder.mkdir()
    for name, (seed, targets) in LORA_LIBRARY.items():
        make_lora(tiny_ckpt, root / "made" / name, seed=seed, targets=targets).rename(folder / f"{name}.safetensors")
    return folder


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


class ServeCommand(TritonProcess):
    """`flux2-klein serve` in a subprocess: the real command, the real tritonserver."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "flux2_klein.cli", "serve", "--repository", str(self.repository),
                "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                "--metrics-port", str(self.metrics_port)]

    def environment(self) -> dict[str, str]:
        return dict(self.base_env)  # `serve` adds the install's own variables itself

    @classmethod
    def started(cls, repo: Path, log_dir: Path, timeout_s: float = 600) -> "ServeCommand":
        """Started and ready, with TritonProcess.launch's one retry."""
        return cls.launch(repo, log_path=Path(log_dir) / "tritonserver.log", timeout_s=timeout_s)


def serve_one_batching_sampler(tiny_ckpt, onnx_dir, tmp_path_factory, name: str, **build) -> "ServeCommand":
    """One instance of each model and one sampler that waits up to a second for company (up to 4 requests):
    concurrent requests share a loop for sure. Batching and inpainting serve it alike (`build`: more
    build_repository options)."""
    from flux2_klein.repository import build_repository
    from flux2_klein.triton_config import Batching, Instances

    repo = build_repository(tiny_ckpt, tmp_path_factory.mktemp(name) / "repo", onnx_dir=onnx_dir,
                            instances=Instances(preprocess=2, sampler=1, text_encoder=1, transformer=1,
                                                vae_decoder=1, vae_encoder=1),
                            batching=Batching(max_requests=4, queue_delay_us=1_000_000), **build)
    return ServeCommand.started(repo, tmp_path_factory.mktemp(f"{name}-logs"))


def model_counts(server, model: str) -> tuple[int, int]:
    """(inference_count, execution_count) of `model` from Triton's statistics."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats") as r:
        s = json.loads(r.read())["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


def run_concurrently(server, run, jobs) -> tuple[list, list[int], list[int]]:
    """`run(job)` for every job at once; their results, and the sampler's and the DiT's [requests, executions]
    over them (from Triton's statistics): how many loops and DiT calls the jobs shared."""
    from concurrent.futures import ThreadPoolExecutor

    sampler_before, dit_before = model_counts(server, "sampler"), model_counts(server, "transformer")
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    sampler = [a - b for a, b in zip(model_counts(server, "sampler"), sampler_before)]
    dit = [a - b for a, b in zip(model_counts(server, "transformer"), dit_before)]
    return results, sampler, dit


class RunningServer:
    """The old name, for test_fp8.py and test_torch_runtime.py (`RunningServer.start(repo, log_dir)`) until
    they call ServeCommand.started."""

    start = ServeCommand.started


@pytest.fixture(scope="session")
def triton_repo(tiny_ckpt, onnx_dir, tmp_path_factory) -> Path:
    from flux2_klein.repository import build_repository

    return build_repository(tiny_ckpt, tmp_path_factory.mktemp("repo") / "repo", onnx_dir=onnx_dir)


@pytest.fixture(scope="session")
def triton_server(triton_repo, tmp_path_factory):
    server = ServeCommand.started(triton_repo, tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()
