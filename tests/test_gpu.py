"""The GPU suite (`pytest -m gpu`): what only a GPU shows, on the tiny checkpoint, in a few minutes.

The GPU branches: tensors kept on the GPU between models (DLPack, GPU outputs asked of BLS, the CUDA sync
before a tensor leaves a model), the torch leaves on cuda, batched denoising, torch.compile with warmed
dynamic shapes, FP8 GEMMs. Skipped on a machine without CUDA, with that reason; bench/gpu_hopper.sh runs it
first, with FLUX2_KLEIN_STUB_SITE naming the numpy 1.x folder the Triton models need there.
Only the standard library talks to Triton here (the GPU machine has no tritonclient).
"""

from __future__ import annotations

import importlib.util
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU suite needs a CUDA GPU; none here"),
]
SIZE = (1024, 1024)


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stats(url: str, model: str) -> tuple[int, int]:
    with urllib.request.urlopen(f"http://{url}/v2/models/{model}/stats") as r:
        s = json.loads(r.read())["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


@pytest.fixture(scope="module")
def gpu_ckpt(tmp_path_factory) -> Path:
    from flux2_klein.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("gpu") / "tiny", seed=0, distilled=True)


@pytest.fixture(scope="module")
def gpu_server(gpu_ckpt, tmp_path_factory):
    """The tiny checkpoint served on the GPU in fp32 (parity), one sampler that batches what queues."""
    from flux2_klein.model_env import make_model_env
    from flux2_klein.repository import build_repository
    from flux2_klein.server import TritonProcess
    from flux2_klein.triton_config import Batching, Instances

    work = tmp_path_factory.mktemp("gpu-serve")
    repo = build_repository(gpu_ckpt, work / "repo", runtime="torch", device="gpu", dtype="fp32",
                            instances=Instances(kind="KIND_GPU", preprocess=1, sampler=1, text_encoder=1,
                                                transformer=1, vae_decoder=1, vae_encoder=1),
                            batching=Batching(max_requests=4, queue_delay_us=300_000), warm_sizes="")
    first = [Path(p) for p in os.environ.get("FLUX2_KLEIN_STUB_SITE", "").split(os.pathsep) if p]
    python = make_model_env(work / "models-env", first)
    bench = _bench()
    libdir = bench._libpython_dir()
    server = TritonProcess.launch(repo, log_path=work / "tritonserver.log", timeout_s=300,
                                  install=bench.triton_install(), path=[python.parent],
                                  library_path=[libdir] if libdir else [], cwd=work)
    yield server, bench
    server.stop()


def _generate(bench, server, prompt: str, seed: int, size=SIZE) -> np.ndarray:
    return bench.infer(server.url("http"), prompt, seed, size, 4, 1.0)


def test_served_image_equals_diffusers_in_fp32_on_the_gpu(gpu_server, gpu_ckpt):
    from diffusers import Flux2KleinPipeline

    from flux2_klein.torch_runtime import configure_torch

    # The served fp32 leaves' cuDNN and TF32 settings, here too: both sides choose the same convolution
    # algorithms (no per-shape benchmarking, no TF32), so the bounds below measure the serving, not cuDNN.
    assert configure_torch("fp32", processes=1)["cudnn_benchmark"] is False
    server, bench = gpu_server
    pipe = Flux2KleinPipeline.from_pretrained(gpu_ckpt, dtype=torch.float32).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    for prompt, seed in (("a red fox in the snow", 7), ("a lighthouse", -3)):
        got = _generate(bench, server, prompt, seed)
        want = np.asarray(pipe(prompt=prompt, width=SIZE[0], height=SIZE[1], num_inference_steps=4,
                               generator=torch.Generator("cpu").manual_seed(seed)).images[0])
        diff = np.abs(got.astype(int) - want.astype(int))
        print(f"seed {seed}: largest difference {diff.max()}, mean {diff.mean():.4f}")
        assert diff.max() <= 1 and diff.mean() <= 0.1


def test_concurrent_requests_batch_and_equal_the_same_requests_alone(gpu_server):
    server, bench = gpu_server
    jobs = [(f"a batched prompt {i}", 100 + i) for i in range(3)]
    alone = [_generate(bench, server, p, s) for p, s in jobs]
    before = _stats(server.http_url, "sampler")
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _generate(bench, server, *job), jobs))
    inferences, executions = (a - b for a, b in zip(_stats(server.http_url, "sampler"), before))
    assert inferences == 3 and executions < 3  # at least two of them shared a denoising loop
    for a, b in zip(alone, together):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_a_leaf_error_is_answered_and_the_server_keeps_serving(gpu_server):
    server, bench = gpu_server
    body = {"inputs": [  # 7 channels where the DiT takes 32: the torch leaf must answer, not die
        {"name": "hidden_states", "datatype": "FP32", "shape": [1, 4, 7], "data": [0.0] * 28},
        {"name": "encoder_hidden_states", "datatype": "FP32", "shape": [1, 512, 48], "data": [0.0] * 512 * 48},
        {"name": "timestep", "datatype": "FP32", "shape": [1], "data": [0.5]},
        {"name": "img_ids", "datatype": "INT64", "shape": [4, 4], "data": [0] * 16},
        {"name": "txt_ids", "datatype": "INT64", "shape": [512, 4], "data": [0] * 2048},
    ]}
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/transformer/infer",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=60)
    assert "transformer" in e.value.read().decode()
    with pytest.raises(RuntimeError, match="height/width"):
        _generate(bench, server, "a bad size", 1, size=(1000, 1000))
    assert _generate(bench, server, "still serving", 1).shape == (SIZE[1], SIZE[0], 3)


def test_compiled_fp8_dit_warmed_once_serves_bf16_requests_of_another_size_without_recompiling(gpu_ckpt):
    """The served configuration's DiT (FP8 GEMMs, torch.compile with inductor, the bf16 boundary's dtypes),
    warmed at one size, then sent what the sampler sends for another size with a reference and batch 3."""
    from flux2_klein.checkpoint import load_checkpoint
    from flux2_klein.specs import example_inputs, network_specs
    from flux2_klein.torch_runtime import WarmShapes, as_served, configure_torch, load_leaf
    from flux2_klein.triton_config import with_boundary

    device = torch.device("cuda")
    configure_torch("bf16")
    spec = with_boundary(network_specs(load_checkpoint(gpu_ckpt)), "bfloat16")["transformer"]
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    leaf = load_leaf(str(gpu_ckpt), "transformer", dtype="bf16", device=device, compile_mode="default", fp8=fp8,
                     warm_shapes=WarmShapes.parse("1024x1024", 4), input_dtypes={t.name: t.dtype for t in spec.inputs})
    eager = load_leaf(str(gpu_ckpt), "transformer", dtype="bf16", device=device, fp8=fp8).module
    example = example_inputs(spec, np.random.default_rng(1), batch=3, size=(1568, 672), references=((672, 1568),))
    with torch.inference_mode():  # as torch_leaf.py reads and runs a request
        args = as_served(example, spec, device)
        got, want = leaf(*args), eager(*args)
    assert leaf.monitor.compiles == 0, "a request compiled again after warm-up"
    assert float((got - want).norm() / want.norm()) < 0.02


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 GEMMs need compute capability 8.9+")
def test_fp8_dit_stays_close_to_bf16(gpu_ckpt):
    from flux2_klein.checkpoint import load_checkpoint
    from flux2_klein.specs import example_inputs, network_specs
    from flux2_klein.torch_runtime import load_leaf

    device = torch.device("cuda")
    spec = network_specs(load_checkpoint(gpu_ckpt))["transformer"]
    example = example_inputs(spec, np.random.default_rng(2), batch=1, size=SIZE)
    args = [torch.from_numpy(example[t.name]).to(device) for t in spec.inputs]
    with torch.inference_mode():
        want = load_leaf(str(gpu_ckpt), "transformer", dtype="bf16", device=device).module(*args)
        leaf = load_leaf(str(gpu_ckpt), "transformer", dtype="bf16", device=device, fp8=True)
        got = leaf.module(*args)
    from flux2_klein.torch_runtime import fp8_layers, fp8_quantized, fp8_root

    # The count is torchao's doing, not our choice: the chosen layers whose sides suit torch._scaled_mm
    # (multiples of 16; torchao/quantization/utils.py _fp8_mm_compat) are those it made float8 tensors.
    root = fp8_root(leaf.module, "transformer")
    done = fp8_quantized(root)
    suited = [n for n in fp8_layers("transformer", root)
              if all(d % 16 == 0 for d in root.get_submodule(n).weight.shape)]
    assert done == suited and f"FP8 GEMMs in {len(done)} of" in leaf.summary
    error = float((got - want).norm() / want.norm())
    print(f"FP8 against BF16, tiny DiT: relative error {error:.4f}")
    assert error < 0.1
