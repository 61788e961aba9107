"""`flux2-klein build --runtime torch`: the four leaf networks as Python models that run the export
wrappers (the diffusers / transformers modules behind the specs' tensors) in PyTorch, served by a real
tritonserver: images equal diffusers' and the ONNX Runtime server's within the contract's tolerance.
And the GPU benchmark's parts that run on a CPU: its driver end to end, its stub environment, its wheels."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path


import numpy as np
import pytest

from conftest import ServeCommand
from flux2_klein.client.triton_client import Flux2KleinClient
from flux2_klein.triton_config import Instances
from runtime_parity import RuntimeParity
from test_serving import assert_equal_images

ROOT = Path(__file__).resolve().parent.parent
LEAVES = ("text_encoder", "transformer", "vae_decoder", "vae_encoder")
# One instance of each leaf: every model still runs in its own stub, at a third of the processes.
SMALL = Instances(preprocess=1, sampler=2, text_encoder=1, transformer=1, vae_decoder=1, vae_encoder=1)


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _params(config: str) -> dict[str, str]:
    return dict(re.findall(r'parameters \{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}', config))


def _tensors(config: str) -> str:
    return config[config.index("input ["):config.index("instance_group")]


@pytest.fixture(scope="module")
def torch_repo(tiny_ckpt, tmp_path_factory) -> Path:
    from flux2_klein.repository import build_repository

    return build_repository(tiny_ckpt, tmp_path_factory.mktemp("torch") / "repo", runtime="torch", device="cpu",
                            instances=SMALL)


@pytest.fixture(scope="module")
def torch_server(torch_repo, tmp_path_factory):
    server = ServeCommand.started(torch_repo, tmp_path_factory.mktemp("torch-logs"))
    yield server
    server.stop()


def test_leaves_are_python_models_that_load_the_checkpoint_where_it_lies(torch_repo, triton_repo, tiny_ckpt):
    for name in LEAVES:
        config = (torch_repo / name / "config.pbtxt").read_text()
        assert 'backend: "python"' in config and "kind: KIND_CPU" in config
        assert _params(config) == {"checkpoint": str(Path(tiny_ckpt).resolve()), "dtype": "fp32", "fp8": "false",
                                   "torch_compile": "", "warm_sizes": "", "max_dit_rows": "8",
                                   "warm_references": "4", "intra_op_threads": "1"}
        # The ONNX Runtime leaf's tensors exactly: the same model, another runtime.
        assert _tensors(config) == _tensors((triton_repo / name / "config.pbtxt").read_text())
        assert sorted(p.name for p in (torch_repo / name / "1").iterdir()) == ["model.py"]  # no weights
    assert "response_cache { enable: true }" in (torch_repo / "text_encoder" / "config.pbtxt").read_text()
    build = json.loads((torch_repo / "build.json").read_text())
    assert (build["runtime"], build["device"], build["dtype"]) == ("torch", "cpu", "fp32")
    assert set(build["sources"]) == set(LEAVES)


def test_build_options_device_dtype_compile(tiny_ckpt, tmp_path):
    from flux2_klein.repository import build_repository

    repo = build_repository(tiny_ckpt, tmp_path / "gpu", runtime="torch", device="gpu", compile=True)
    for name in (*LEAVES, "sampler"):  # preprocess is host work wherever the rest runs
        config = (repo / name / "config.pbtxt").read_text()
        assert "kind: KIND_GPU" in config and _params(config)["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
    assert "count: 1 kind: KIND_GPU" in (repo / "transformer" / "config.pbtxt").read_text()  # GPU_INSTANCES
    params = _params((repo / "transformer" / "config.pbtxt").read_text())
    assert (params["dtype"], params["torch_compile"]) == ("bf16", "default")  # bf16 on a GPU by default
    assert json.loads((repo / "build.json").read_text())["device"] == "gpu"

    repo = build_repository(tiny_ckpt, tmp_path / "fp16", runtime="torch", device="gpu", dtype="fp16",
                            compile="max-autotune-no-cudagraphs")
    params = _params((repo / "vae_decoder" / "config.pbtxt").read_text())
    assert (params["dtype"], params["torch_compile"]) == ("fp16", "max-autotune-no-cudagraphs")

    bad = [
        (dict(runtime="onnxruntime", compile=True), "only the torch runtime compiles"),
        (dict(runtime="torch", compile="reduce-overhead"), "allowed: default, max-autotune-no-cudagraphs"),
        (dict(runtime="torch", device="tpu"), "allowed: cpu, gpu"),
        (dict(runtime="torch", onnx_dir=tmp_path), "takes no ONNX graphs"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            build_repository(tiny_ckpt, tmp_path / "bad", **kwargs)


class TestTorchRuntimeParity(RuntimeParity):
    """tests/runtime_parity.py's cases on the torch runtime's leaves."""

    @pytest.fixture
    def served(self, torch_server):
        return torch_server


def test_image_equals_the_onnx_runtime_servers(torch_server, triton_server):
    images = []
    for server in (torch_server, triton_server):
        with Flux2KleinClient(server.http_url, protocol="http") as client:
            images.append(client.generate("a red fox in the snow", width=1248, height=832, seed=11))
    assert_equal_images(*images)


def test_gpu_bench_driver_runs_end_to_end_on_a_cpu(torch_server, tiny_ckpt, tmp_path):
    """The real driver, each phase in its own process, against the running torch-runtime server."""
    out = tmp_path / "report"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "all", "--checkpoint", str(tiny_ckpt),
         "--device", "cpu", "--work", str(tmp_path / "work"), "--url", torch_server.http_url, "--requests", "1",
         "--metrics-url", f"{torch_server.address}:{torch_server.metrics_port}",
         "--concurrency", "1,2", "--rounds", "1", "--warmup", "0", "--diffusers-compile", "",
         "--report-dir", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "| images/s at 2 |" in r.stdout and "Serving overhead:" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["device"].startswith("CPU") and "diffusers-compiled" not in report
    d, t = report["diffusers"], report["triton"]
    assert d["latency_s"]["n"] == 1 and [lv["images"] for lv in t["levels"]] == [1, 2]
    assert d["levels"][1]["how"] == "a batch of 2 prompts per call" and d["fp8"]["skipped"]
    assert set(report["ratios"]) == {"latency_vs_eager", "overhead_ms", "compiles_after_warm_up"}
    assert report["ratios"]["compiles_after_warm_up"] == 0 and [p["phase"] for p in report["phases"]] == ["diffusers", "triton"]
    # Triton's own statistics: four DiT calls per 4-step request, and the overhead is what they leave.
    assert t["models_c1"]["transformer"]["calls_per_request"] == 4
    o = t["overhead_c1"]
    assert o["overhead_ms"] == pytest.approx(o["e2e_ms"] - o["leaf_compute_ms"]) and o["leaf_compute_ms"] > 0
    # The leaves' own timing (leaf_timing's metrics): four DiT network calls per request, and the overhead from
    # inside is end to end minus the networks, so at least what Triton's statistics leave.
    assert t["networks_c1"]["transformer"]["calls_per_request"] == 4 and "preprocess" not in t["networks_c1"]
    inside = t["overhead_inside_c1"]
    assert inside["overhead_ms"] == pytest.approx(inside["e2e_ms"] - inside["network_ms"])
    assert inside["network_ms"] <= o["leaf_compute_ms"] and inside["overhead_ms"] >= o["overhead_ms"]
    assert d["torch_settings"]["coordinate_descent_tuning"] is False
    # Same checkpoint, prompt and seed, float32 on both sides: the first images agree as the contract says.
    assert report["first_image_difference"]["diffusers vs triton"]["max"] <= 2
    assert {"report.md", "diffusers_image0.png", "triton_image0.png"} <= {p.name for p in out.iterdir()}


def test_gpu_bench_arguments():
    bench = _bench("gpu_bench")
    args = bench.parse_args(["all", "--tiny", "--work", "w", "--device", "cpu", "--size", "672x1568",
                             "--concurrency", "4,1,2"])
    assert args.checkpoint == Path("w") / "tiny" and args.size == (672, 1568) and args.concurrency == [1, 2, 4]
    assert (args.precision, args.compile) == ("bf16", "default")  # a CPU rehearsal never asks for FP8
    args = bench.parse_args(["all", "--checkpoint", "c", "--work", "w"])
    assert (args.precision, args.concurrency, args.diffusers_compile) == ("fp8", [1, 2, 4, 8], "default")
    for argv in (["all", "--work", "w"], ["all", "--tiny", "--work", "w", "--concurrency", "0"],
                 ["all", "--tiny", "--work", "w", "--size", "1024"], ["serve", "--tiny", "--work", "w"],
                 ["all", "--tiny", "--work", "w", "--rounds", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_carried_pytriton_wheel_keeps_only_this_pythons_stub(tmp_path):
    carry = _bench("carry_wheels")
    wheel = tmp_path / "nvidia_pytriton-0.7.0-py3-none-manylinux_2_35_x86_64.whl"
    names = ["pytriton/tritonserver/bin/tritonserver",
             "pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub",
             "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub",
             "nvidia_pytriton.libs/libpython3-419a3a08.13.so.1.0",
             "nvidia_pytriton.libs/libtritonserver-717102f0.so"]
    with zipfile.ZipFile(wheel, "w") as z:
        for n in names:
            z.writestr(n, n)
        z.writestr("nvidia_pytriton-0.7.0.dist-info/RECORD", "".join(f"{n},sha256=x,1\n" for n in names))
    carry.slim_pytriton(wheel, "3.12")
    with zipfile.ZipFile(wheel) as z:
        kept = [n for n in names if n in z.namelist()]
        record = z.read("nvidia_pytriton-0.7.0.dist-info/RECORD").decode()
    assert kept == [names[0], names[2], names[4]]
    assert [line.split(",")[0] for line in record.splitlines()] == kept


def test_carried_torchao_and_numpy_wheels_lose_only_what_the_gpu_run_does_not_need(tmp_path):
    carry = _bench("carry_wheels")
    for name, files, slim, kept in [
        ("torchao-0.18.0-cp310-abi3-manylinux_2_28_x86_64.whl",
         ["torchao/__init__.py", "torchao/_C_cutlass_90a.abi3.so", "torchao/float8/inference.py"],
         carry.slim_torchao, [0, 2]),
        ("numpy-1.26.4-cp312-cp312-manylinux_2_17_x86_64.whl",
         ["numpy/__init__.py", "numpy/core/tests/test_api.py", "numpy/core/_multiarray_umath.so"],
         carry.slim_numpy, [0, 2]),
    ]:
        wheel = tmp_path / name
        with zipfile.ZipFile(wheel, "w") as z:
            for f in files:
                z.writestr(f, f)
        slim(wheel)
        with zipfile.ZipFile(wheel) as z:
            assert [f for f in files if f in z.namelist()] == [files[i] for i in kept]


def test_gpu_script_is_valid_bash_and_installs_what_carry_wheels_brings():
    script = (ROOT / "bench" / "gpu_hopper.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_hopper.sh")]).returncode == 0
    carry = _bench("carry_wheels")
    assert {w.split("==")[0] for w in carry.WHEELS} == {"nvidia-pytriton", "diffusers", "numpy", "torchao",
                                                      "pytest", "pluggy", "iniconfig"}
    assert "numpy==1.26.4" in carry.WHEELS and "numpy-1.*.whl" in script and "--stub-site" in script
    assert "--device \"$DEVICE\"" in script and "DEVICE=${DEVICE:-gpu}" in script
    # The smoke test of the served configuration first; the 4B phases after it; the suite last, its Triton
    # models with the same numpy 1.x folder. No `set -e`: a failed phase must not stop the others.
    order = [script.index(f"phase {name} ") for name in ("setup", "smoke", "checkpoint", "diffusers", "triton",
                                                         "diffusers-compiled", "gpu-tests")]
    assert order == sorted(order) and "set -uo pipefail" in script and "set -e" not in script
    assert 'FLUX2_KLEIN_STUB_SITE="$STUB_NUMPY"' in script and "BUDGET_S:=480" in script


def test_gpu_bench_check_finds_tritonserver_without_pytritons_client_stack(tmp_path):
    """The GPU machine carries the nvidia-pytriton wheel alone: `import pytriton` fails there for want of
    tritonclient, zmq and the rest, and the driver must still find the bundled tritonserver."""
    probe = ("import sys; sys.modules['tritonclient'] = None; sys.path.insert(0, sys.argv[1])\n"
             "import gpu_bench; print(gpu_bench.triton_install().binary)")
    r = subprocess.run([sys.executable, "-c", probe, str(ROOT / "bench")], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("tritonserver/bin/tritonserver"), r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "check", "--device", "cpu",
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "models' environment: python" in r.stdout and "numpy 1." in r.stdout


# -- the torch runtime's choices, as far as a CPU can check them (the GPU suite runs them for real) --------------

TINY_FP8_DIT = [  # every GEMM of the tiny DiT's blocks, and nothing that `export fp8` keeps in BF16
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
    "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_q_proj",
    "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj",
    "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.linear_in", "transformer_blocks.0.ff.linear_out",
    "transformer_blocks.0.ff_context.linear_in", "transformer_blocks.0.ff_context.linear_out",
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out",
]


def test_fp8_takes_the_gemms_export_fp8_takes_and_refuses_a_cpu(tiny_ckpt):
    import torch

    from flux2_klein.checkpoint import load_checkpoint
    from flux2_klein.networks import load_wrapper
    from flux2_klein.torch_runtime import fp8_layers, fp8_root, quantize_fp8

    ckpt = load_checkpoint(tiny_ckpt)
    dit = load_wrapper(ckpt, "transformer", torch.float32)
    assert fp8_layers("transformer", fp8_root(dit, "transformer")) == TINY_FP8_DIT
    text = fp8_root(load_wrapper(ckpt, "text_encoder", torch.float32), "text_encoder")
    names = fp8_layers("text_encoder", text)
    assert len(names) == 7 * len(text.layers) and names[:3] == [
        "layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"]
    with pytest.raises(RuntimeError, match="fp8: transformer needs a GPU of compute capability 8.9"):
        quantize_fp8(fp8_root(dit, "transformer"), "transformer")
    with pytest.raises(ValueError, match="fp8: 'vae_decoder' has no FP8 GEMMs"):
        fp8_layers("vae_decoder", dit)


def test_torch_build_options_reach_each_leaf(tiny_ckpt, tmp_path):
    from flux2_klein.repository import build_repository
    from flux2_klein.triton_config import Batching

    repo = build_repository(tiny_ckpt, tmp_path / "fp8", runtime="torch", device="gpu", precision="fp8",
                            fp8_text_encoder=True, compile=True, batching=Batching(max_requests=8, max_dit_rows=16))
    fp8 = {name: _params((repo / name / "config.pbtxt").read_text())["fp8"] for name in LEAVES}
    assert fp8 == {"text_encoder": "true", "transformer": "true", "vae_decoder": "false", "vae_encoder": "false"}
    params = _params((repo / "transformer" / "config.pbtxt").read_text())
    assert (params["warm_sizes"], params["max_dit_rows"]) == ("all", "16")  # compiled: every size warmed
    build = json.loads((repo / "build.json").read_text())
    assert (build["precision"], build["fp8"]) == ("fp8", ["transformer", "text_encoder"])
    eager = build_repository(tiny_ckpt, tmp_path / "eager", runtime="torch", device="gpu")
    params = _params((eager / "transformer" / "config.pbtxt").read_text())
    assert (params["fp8"], params["warm_sizes"]) == ("false", "1024x1024")  # bf16 until FP8 is measured
    bad = [
        (dict(runtime="torch", device="cpu", precision="fp8"), "FP8 GEMMs need a GPU"),
        (dict(runtime="onnxruntime", precision="fp8"), "FP8 on runtime onnxruntime"),
        (dict(runtime="onnxruntime", warm_sizes="all"), "only the torch runtime warms"),
        (dict(runtime="torch", precision="fp4"), "precision: 'fp4' is not supported"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            build_repository(tiny_ckpt, tmp_path / "bad", **kwargs)


def test_warm_shapes_cover_every_size_batch_and_reference_count(tiny_ckpt):
    import torch

    from flux2_klein.checkpoint import load_checkpoint
    from flux2_klein.specs import network_specs
    from flux2_klein.torch_runtime import WarmShapes, load_leaf, warm_inputs

    shapes = WarmShapes.parse("all", 8)
    assert len(shapes.sizes) == 17 and shapes.batches == (1, 2, 8)
    specs = network_specs(load_checkpoint(tiny_ckpt))
    dit = warm_inputs(specs["transformer"], shapes)
    # 17 sizes at batch 1, batches 2 and 8 at 1024x1024, and 1..4 references of 1024x1024 (4096 tokens each).
    assert len(dit) == 17 + 2 + 4
    assert sorted({x["hidden_states"].shape[0] for x in dit}) == [1, 2, 8]
    assert max(x["hidden_states"].shape[1] for x in dit) == 5 * 4096
    assert len(warm_inputs(specs["vae_decoder"], shapes)) == 17 and len(warm_inputs(specs["text_encoder"], shapes)) == 1
    assert WarmShapes.parse("", 8) == WarmShapes() and warm_inputs(specs["vae_decoder"], WarmShapes()) == []
    # What the bench sends: one size, no references (the VAE encoder then warms nothing).
    bench = WarmShapes.parse("1024x1024", 4, references=0)
    assert warm_inputs(specs["vae_encoder"], bench) == [] and len(warm_inputs(specs["transformer"], bench)) == 3
    with pytest.raises(ValueError, match="warm_references: 5 is not in 0..4"):
        WarmShapes.parse("1024x1024", 1, references=5)
    assert WarmShapes.parse("1024x1024,672x1568", 1).sizes == ((1024, 1024), (672, 1568))
    with pytest.raises(ValueError, match="warm_sizes: '1024' is not WIDTHxHEIGHT"):
        WarmShapes.parse("1024", 1)
    leaf = load_leaf(str(tiny_ckpt), "vae_decoder", dtype="fp32", device=torch.device("cpu"),
                     warm_shapes=WarmShapes.parse("672x1568", 1))
    assert "vae_decoder: fp32 on cpu" in leaf.summary and "1 shapes warmed" in leaf.summary


def test_bf16_leaves_hand_each_other_bf16_losslessly(tiny_ckpt, tmp_path_factory):
    """Leaves computing in bf16 exchange the prompt embedding and the DiT's token states in bf16: half the
    bytes (and half the text encoder's host copy for the response cache), and no loss, since each module casts
    its inputs to bf16 and computes its outputs in bf16. So the image equals the same bf16 leaves' with
    float32 hand-offs, exactly; the Euler steps stay float32 in the sampler either way."""
    from flux2_klein.repository import build_repository

    work = tmp_path_factory.mktemp("bf16")
    repo = build_repository(tiny_ckpt, work / "bf16", runtime="torch", device="cpu", dtype="bf16", instances=SMALL)
    te, dit = ((repo / n / "config.pbtxt").read_text() for n in ("text_encoder", "transformer"))
    assert 'name: "prompt_embeds" data_type: TYPE_BF16' in te
    for name in ("hidden_states", "encoder_hidden_states", "velocity"):
        assert f'name: "{name}" data_type: TYPE_BF16' in dit
    assert 'name: "timestep" data_type: TYPE_FP32' in dit  # small, and the scheduler's float32
    assert _params((repo / "sampler" / "config.pbtxt").read_text())["dit_dtype"] == "bf16"
    assert json.loads((repo / "build.json").read_text())["boundary"] == "bfloat16"
    wide = build_repository(tiny_ckpt, work / "fp32", runtime="torch", device="cpu", dtype="bf16", instances=SMALL,
                            boundary="float32")
    assert 'name: "velocity" data_type: TYPE_FP32' in (wide / "transformer" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="boundary: 'bfloat16' is not supported here"):
        build_repository(tiny_ckpt, work / "bad", runtime="torch", device="cpu", boundary="bfloat16")
    images = []
    for r in (repo, wide):
        server = ServeCommand.started(r, work / f"{r.name}-logs")
        try:
            with Flux2KleinClient(server.grpc_url) as client:
                images.append(client.generate("a red fox in the snow", width=1248, height=832, seed=11))
                images.append(client.generate("a red fox in the snow", width=1248, height=832, seed=11))  # cached
        finally:
            server.stop()
    assert all(np.array_equal(images[0], image) for image in images[1:])


def test_gpu_report_keeps_a_phase_cut_short_and_judges_overhead_and_compiles_from_inside(tmp_path):
    """What a GPU run that timed out in its triton phase leaves: the report from the results so far, the
    phases' status, the overhead from the leaves' own network times, compiles after warm-up judged."""
    import argparse

    report = _bench("gpu_report")
    (tmp_path / "phases.tsv").write_text("smoke\tok\t95\ndiffusers\tok\t70\ntriton\ttimed out after 250 s\t250\n")
    eager = {"what": "diffusers", "latency_s": {"p50": 1.0, "p90": 1.1}, "levels": [], "load_s": 20.0}
    triton = {"what": "Triton (measuring)", "partial": True, "ready_s": 200.0, "latency_s": {"p50": 0.5, "p90": 0.6},
              "models_c1": {"transformer": {"calls": 4, "calls_per_request": 4, "compute_ms": 400.0, "queue_ms": 1.0}},
              "overhead_c1": {"overhead_ms": 8.0, "e2e_ms": 500.0, "leaf_compute_ms": 492.0, "sampler_own_ms": 5.0,
                              "queue_ms": 1.0},
              "networks_c1": {"transformer": {"calls_per_request": 4, "network_ms": 480.0, "compiles": 1}},
              "overhead_inside_c1": {"e2e_ms": 500.0, "network_ms": 480.0, "overhead_ms": 20.0},
              "compiles_after_warm_up": {"transformer": 1, "vae_decoder": 0}}
    args = argparse.Namespace(size=(1024, 1024), concurrency=[1, 4], work=tmp_path, checkpoint=tmp_path / "ckpt",
                              tiny=False, device="cpu")
    r = report.build({"diffusers": eager, "triton": triton}, args, 4, 1.0)
    assert "| triton | timed out after 250 s | 250 |" in r.text and "Cut short (their results so far): triton" in r.text
    assert "Triton (measuring) (cut short)" in r.text
    assert r.data["ratios"] == {"latency_vs_eager": 0.5, "overhead_ms": 20.0, "compiles_after_warm_up": 1}
    assert "| overhead_ms | 20.000 | <= 10 | NOT met |" in r.text  # the inside view, not Triton's 8 ms
    assert "| compiles_after_warm_up | 1.000 | <= 0 | NOT met |" in r.text
    assert "| transformer | 4 | 400.0 | 480.0 | 1.0 |" in r.text
    assert report.GOALS["overhead_ms"] == 10.0  # the one goal, from client/bench/stats.py
