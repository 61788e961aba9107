#!/usr/bin/env python3
"""FLUX.2 [klein] on one Hopper GPU, offline: diffusers (eager and compiled) against our Triton stack, in one run.

    python bench/gpu_bench.py all --checkpoint CKPT --work DIR [options]       (bench/gpu_hopper.sh runs it)
    python bench/gpu_bench.py all --tiny --device cpu --work DIR ...           a CPU rehearsal, tiny checkpoint

Phases; the ones that use the accelerator run each in a process of its own, so each finds the GPU free. Each
writes WORK/<phase>.json as it goes (after every level), so a phase cut short still leaves what it measured:
  check               seconds: tritonserver, its Python-backend stub, libpython, the models' clean environment
  smoke               the triton phase's served configuration (bf16 boundary, torch leaves, FP8 on a GPU,
                      compile) on the given checkpoint with two requests: ready, answers, compiles nothing
  diffusers           Flux2KleinPipeline, eager: seconds per image one at a time, images/s with a batch of c
                      prompts per call for each c; then FP8 (torchao, our layer choice) against BF16 on the same
                      inputs: the DiT velocity's error and the image's PSNR (text encoder too, in FP8)
  diffusers-compiled  the same pipeline with torch.compile on its transformer and VAE decoder
  triton              `flux2-klein build --runtime torch --device gpu` (precision, compile, warm sizes as asked),
                      served by tritonserver: seconds to ready, latency one at a time, images/s with c clients,
                      every model's time from Triton's statistics, each network's own time from the leaves'
                      metrics (flux2_klein/leaf_timing.py), the serving overhead, compiles after warm-up
  report              report.md and report.json from the phases' results (bench/gpu_report.py)
Every side gets the same prompts and seeds (prompt i, seed i); warm-up requests use other prompts, and each
concurrency level yet others, so Triton's response cache never answers a timed request. Both sides run under
the same inductor and cuDNN settings (torch_runtime.configure_torch) and are timed the same way: from the
prompt to a uint8 image in host memory (diffusers' tensor output converted on the GPU, as our VAE leaf does).
A triton or smoke phase whose leaves compiled anything after warm-up exits 3, its result written.
One file over 400 lines on purpose: it travels to the GPU machine as a plain script beside gpu_report.py
(bench/ is no package), and its phases share the helpers here. The project comes from the installed package
(bench/gpu_hopper.sh installs it); gpu_report is imported where a phase needs it, from this script's folder,
which Python puts first on sys.path when it runs the script (tests that load this file for its helpers need
no report).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from flux2_klein.contract import PRECISIONS
from flux2_klein.dtypes import DEVICE_DTYPES, torch_dtype
from flux2_klein.sizes import size_argument

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
# Triton's pool for GPU tensors handed between models (default 64 MB): a prompt embedding is 16 MB, and
# several requests are in flight at once.
CUDA_POOL_BYTES = 2 << 30


def prompts(tag: str, n: int) -> list[tuple[str, int]]:
    """(prompt, seed) pairs; each phase has its own tag, so no timed prompt was seen before."""
    return [(f"{PROMPT}, {tag} {i}", i) for i in range(n)]


def summary(seconds: list[float]) -> dict:
    xs = sorted(seconds)
    pick = lambda q: xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]  # noqa: E731
    return {"n": len(xs), "p50": statistics.median(xs), "p90": pick(0.9), "mean": statistics.fmean(xs),
            "min": xs[0], "max": xs[-1]}


def checkpoint_defaults(ckpt: Path) -> tuple[int, float]:
    from flux2_klein.checkpoint import load_checkpoint

    c = load_checkpoint(ckpt)
    return c.default_steps, c.default_guidance


def _sync(gpu: bool) -> None:
    if gpu:
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ diffusers

def _pipeline(args):
    import torch
    from diffusers import Flux2KleinPipeline

    from flux2_klein.torch_runtime import configure_torch

    # The leaves' inductor and cuDNN settings; one process compiles here, so it takes every core's worker.
    args.torch_settings = configure_torch(DEVICE_DTYPES[args.device], processes=1)
    device = "cuda" if args.device == "gpu" else "cpu"
    start = time.perf_counter()
    pipe = Flux2KleinPipeline.from_pretrained(args.checkpoint, dtype=torch_dtype(DEVICE_DTYPES[args.device])).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, time.perf_counter() - start


def _caller(pipe, args):
    import torch

    steps, guidance = checkpoint_defaults(args.checkpoint)
    width, height = args.size

    def call(batch: list[tuple[str, int]]) -> tuple[float, list[np.ndarray]]:
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
        _sync(args.device == "gpu")
        t = time.perf_counter()
        out = pipe(prompt=[p for p, _ in batch], height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generators, output_type="pt")
        # What our VAE leaf does on the GPU and what diffusers' PIL path computes: [0, 1] * 255, rounded half
        # to even, as uint8 HWC; then to host memory, where Triton's client holds its image.
        images = (out.images.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()
        _sync(args.device == "gpu")
        return time.perf_counter() - t, list(images.numpy())
    return call


def _measure_pipeline(call, args, tag: str, save=lambda part: None) -> dict:
    """Latency one at a time, then images/s with a batch of c prompts per call, for each c; `save(part)` after
    each, so that a phase cut short keeps what it measured."""
    for job in prompts("warm-up", args.warmup):
        call([job])
    latencies, first = [], None
    for job in prompts("sequential", args.requests):
        seconds, images = call([job])
        latencies.append(seconds)
        first = images[0] if first is None else first
    np.save(Path(args.work) / f"{tag}_image0.npy", first)
    levels = []
    save({"latency_s": summary(latencies), "levels": levels})
    for c in args.concurrency:
        if args.warmup and c > 1:
            call(prompts(f"warm-up batch {c}", c))
        jobs = prompts(f"batch {c}", c * args.rounds)
        seconds = [call(jobs[i * c:(i + 1) * c])[0] for i in range(args.rounds)]
        levels.append({"concurrency": c, "how": f"a batch of {c} prompts per call", "images": c * args.rounds,
                       "seconds": sum(seconds), "images_per_s": c * args.rounds / sum(seconds)})
        save({"latency_s": summary(latencies), "levels": levels})
    return {"latency_s": summary(latencies), "levels": levels}


def _psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak * peak / mse)


def _fp8_error(pipe, call, args) -> dict:
    """FP8 (torchao, the layers our leaves quantize) against BF16, same pipeline, same inputs."""
    import torch

    from flux2_klein.torch_runtime import quantize_fp8

    captured = {}

    def keep(_module, _args, kwargs):
        if not captured:
            captured.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    job = prompts("fp8", 1)
    _, (bf16_image,) = call(job)
    handle.remove()
    from flux2_klein.torch_runtime import fp8_layers

    with torch.inference_mode():
        ref = pipe.transformer(**captured)[0].float()
        chosen = fp8_layers("transformer", pipe.transformer)
        layers = quantize_fp8(pipe.transformer, "transformer")
        got = pipe.transformer(**captured)[0].float()
    _, (dit_image,) = call(job)
    with torch.inference_mode():
        te_layers = quantize_fp8(pipe.text_encoder.model, "text_encoder")
    _, (both_image,) = call(job)
    err = (got - ref).norm() / ref.norm()
    v_ref, v_got = ref.cpu().numpy(), got.cpu().numpy()
    return {
        "how": "torchao Float8DynamicActivationFloat8WeightConfig(PerRow): dynamic per-row activation scales, "
               "per-row weight scales; one DiT call's inputs replayed, and one whole image",
        "dit_layers": len(layers), "dit_layers_chosen": len(chosen), "text_encoder_layers": len(te_layers),
        "velocity_relative_error": float(err),
        "velocity_psnr_db": _psnr(v_got, v_ref, float(np.abs(v_ref).max())),
        "image_psnr_db_dit_fp8": _psnr(dit_image, bf16_image, 255.0),
        "image_psnr_db_dit_and_text_encoder_fp8": _psnr(both_image, bf16_image, 255.0),
    }


def run_diffusers(args, compiled: bool, save=lambda part: None) -> dict:
    import torch

    from diffusers import __version__ as diffusers_version

    gpu = args.device == "gpu"
    pipe, load_s = _pipeline(args)
    what = f"diffusers {diffusers_version} Flux2KleinPipeline, {DEVICE_DTYPES[args.device]}"
    compile_s = None
    if compiled:
        mode = args.diffusers_compile
        pipe.transformer = torch.compile(pipe.transformer, mode=mode)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=mode)
        what += f", torch.compile {mode} (transformer, VAE decoder)"
    call = _caller(pipe, args)
    with torch.inference_mode():
        if compiled:  # the compile happens on the first calls: time it apart
            start = time.perf_counter()
            for c in sorted({1, *args.concurrency}):
                call(prompts(f"compile {c}", c))
            compile_s = time.perf_counter() - start
        head = {"what": what, "load_s": load_s, "compile_s": compile_s, "torch_settings": args.torch_settings}
        result = _measure_pipeline(call, args, "diffusers_compiled" if compiled else "diffusers",
                                   lambda part: save({**head, **part}))
    if not compiled:
        if gpu and torch.cuda.get_device_capability() >= (8, 9):
            result["fp8"] = _fp8_error(pipe, call, args)
        else:
            result["fp8"] = {"skipped": "FP8 GEMMs need a GPU of compute capability 8.9+"}
    return {"what": what, "load_s": load_s, "compile_s": compile_s, "torch_settings": args.torch_settings, **result,
            "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None}


# ------------------------------------------------------------------------------------------------ triton

def infer(url: str, prompt: str, seed: int, size: tuple[int, int], steps: int, guidance: float,
          timeout_s: float = 600) -> np.ndarray:
    """One image from the ensemble over Triton's HTTP protocol (JSON in, binary image out); stdlib only.

    Not the client library's Flux2KleinClient: the GPU machine carries no tritonclient (bench/carry_wheels.py;
    its HTTP client needs gevent, geventhttpclient, greenlet and zope, about 15 MB installed, beside a carried
    nvidia-pytriton of about 40 MB in a 64 MiB budget). The request's tensors are the client's all the same
    (contract.input_arrays: names, KServe datatypes, checks); only KServe's JSON framing is here."""
    from flux2_klein.contract import MODEL_NAME, OUTPUT, input_arrays

    width, height = size
    tensors = input_arrays(prompt, width=width, height=height, seed=seed, steps=steps, guidance=guidance)
    body = {
        # BYTES in JSON are strings: the prompt's UTF-8 (this request sends no reference images).
        "inputs": [{"name": name, "datatype": datatype, "shape": list(array.shape),
                    "data": [v.decode() for v in array] if datatype == "BYTES" else array.tolist()}
                   for name, (datatype, array) in tensors.items()],
        "outputs": [{"name": OUTPUT.name, "parameters": {"binary_data": True}}],
    }
    request = urllib.request.Request(f"http://{url}/v2/models/{MODEL_NAME}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            raw = r.read()
            header_length = int(r.headers.get("Inference-Header-Content-Length", len(raw)))
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{MODEL_NAME}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
    header = json.loads(raw[:header_length])
    (output,) = header["outputs"]
    return np.frombuffer(raw[header_length:], dtype=np.uint8).reshape(output["shape"])


class HttpStatistics:
    """Triton's statistics over HTTP with the stdlib: what flux2_klein.client.bench.stats reads from a client."""

    def __init__(self, url: str):
        self.url = url

    def get_inference_statistics(self, model_name: str = "", as_json: bool = True) -> dict:
        with urllib.request.urlopen(f"http://{self.url}/v2/models/stats", timeout=30) as r:
            return json.loads(r.read())


def _networks(d: dict, requests: int) -> dict:
    """The leaves' own network time (leaf_timing's metrics delta over a level) per request."""
    n = max(requests, 1)
    return {m: {"calls_per_request": row["calls"] / n, "network_ms": 1000 * row["network_s"] / n,
                "compiles": row["compiles"]} for m, row in sorted(d.items())}


def overhead_inside(e2e_ms: float, networks: dict) -> dict:
    """Serving overhead measured from inside: end to end minus the networks themselves (every leaf's own
    timing of its forward pass), so what Triton adds inside a leaf's compute time counts as overhead too."""
    network = sum(row["network_ms"] for row in networks.values())
    return {"e2e_ms": e2e_ms, "network_ms": network, "overhead_ms": e2e_ms - network}


def measure_triton(url: str, args, work: Path, metrics_url: str | None = None, save=lambda part: None,
                   tag: str = "triton") -> dict:
    from flux2_klein.client.bench import stats
    from flux2_klein.leaf_timing import metrics_delta, read_metrics

    steps, guidance = checkpoint_defaults(args.checkpoint)
    client = HttpStatistics(url)
    metrics = (lambda: read_metrics(metrics_url)) if metrics_url else (lambda: {})

    def one(job):
        t = time.perf_counter()
        image = infer(url, job[0], job[1], args.size, steps, guidance)
        return time.perf_counter() - t, image

    for job in prompts("warm-up", args.warmup):
        one(job)
    for c in args.concurrency:  # every instance and batch size runs once before anything is timed
        if args.warmup and c > 1:
            with ThreadPoolExecutor(c) as pool:
                list(pool.map(one, prompts(f"warm-up {c}", c)))
    before, inside_before = stats.settled_snapshot(client), metrics()
    latencies, first = [], None
    for job in prompts("sequential", args.requests):
        seconds, image = one(job)
        latencies.append(seconds)
        first = image if first is None else first
    after = stats.settled_snapshot(client, expected=None)
    np.save(work / f"{tag}_image0.npy", first)
    one_level = {"latency_ms": {"avg": 1000 * statistics.fmean(latencies)},
                 "models": stats.model_table(stats.delta(before, after))}
    out = {"latency_s": summary(latencies), "models_c1": one_level["models"],
           "overhead_c1": stats.overhead(one_level), "levels": []}
    if metrics_url:
        out["networks_c1"] = _networks(metrics_delta(inside_before, metrics()), len(latencies))
        out["overhead_inside_c1"] = overhead_inside(one_level["latency_ms"]["avg"], out["networks_c1"])
    save(out)
    for c in args.concurrency:
        jobs = prompts(f"concurrent {c}", c * args.rounds)
        before = stats.settled_snapshot(client)
        with ThreadPoolExecutor(c) as pool:
            start = time.perf_counter()
            results = list(pool.map(one, jobs))
            wall = time.perf_counter() - start
        models = stats.model_table(stats.delta(before, stats.settled_snapshot(client)))
        out["levels"].append({"concurrency": c, "how": f"{c} clients at once", "images": len(jobs), "seconds": wall,
                              "images_per_s": len(jobs) / wall, "latency_s": summary([s for s, _ in results]),
                              "models": models,
                              "sampler_batch_mean": models["sampler"]["calls"] / max(models["sampler"]["executions"], 1)})
        save(out)
    if metrics_url:  # compiles after each leaf's warm-up, over every request this run sent (warm-ups included)
        out["compiles_after_warm_up"] = {m: int(row["compiles"]) for m, row in sorted(metrics().items())}
    return out


def _libpython_dir() -> str | None:
    """Where libpythonX.Y.so.1.0 lies: the bundled stub links it, and a Python built static (Debian's,
    Ubuntu's) has it only as a separate library. None when the loader finds it unaided."""
    import sysconfig

    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    dirs = [sysconfig.get_config_var("LIBDIR"), os.path.join(sys.base_prefix, "lib"),
            "/usr/lib/x86_64-linux-gnu", "/usr/local/lib", "/lib/x86_64-linux-gnu"]
    for d in filter(None, dirs):
        if (Path(d) / name).exists():
            return d
    try:
        if name in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout:
            return None
    except OSError:
        pass
    raise FileNotFoundError(f"{name}: not on this machine; the Triton Python-backend stub for "
                            f"Python {sys.version_info.major}.{sys.version_info.minor} needs it")


def triton_install():
    """flux2_klein.server's tritonserver (PATH, /opt/tritonserver, or the nvidia-pytriton wheel's)."""
    from flux2_klein import server

    try:
        return server.find_tritonserver()
    except FileNotFoundError:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise
    # pytriton's __init__ imports its own client stack, which a machine with only the carried wheel lacks;
    # find_tritonserver needs nothing of it but the package's place.
    shim = types.ModuleType("pytriton")
    shim.__file__ = str(Path(next(iter(spec.submodule_search_locations))) / "__init__.py")
    sys.modules["pytriton"] = shim
    try:
        return server.find_tritonserver()
    finally:
        del sys.modules["pytriton"]


def models_env(args) -> Path:
    from flux2_klein.model_env import make_model_env

    return make_model_env(Path(args.work) / "models-env", args.stub_site)


def start_triton(repo: Path, args, log_name: str = "triton-tritonserver.log"):
    from flux2_klein.server import TritonProcess

    libdir = _libpython_dir()
    python = models_env(args)
    extra = (f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}",) if args.device == "gpu" else ()
    # The stubs put their working folder first on sys.path: not a checkout's raw flux2_klein/ folder.
    return TritonProcess.launch(repo, log_path=Path(args.work) / log_name, timeout_s=args.ready_timeout,
                                install=triton_install(), path=[python.parent], extra_args=extra,
                                library_path=[libdir] if libdir else [], cwd=args.work)


def dit_rows(args) -> int:
    """The DiT rows the bench's requests bring at most: one per request, two under guidance."""
    from flux2_klein.checkpoint import load_checkpoint
    from flux2_klein.sampling import use_cfg

    _, guidance = checkpoint_defaults(args.checkpoint)
    return max(args.concurrency) * (2 if use_cfg(load_checkpoint(args.checkpoint).is_distilled, guidance) else 1)


def run_triton(args, save=lambda part: None, tag: str = "triton", dtype: str | None = None) -> dict:
    """Build the repository, serve it, measure it. `tag` names its files (triton, smoke); `dtype` the leaves'
    (default DEVICE_DTYPES[device])."""
    import gpu_report

    work = Path(args.work)
    if args.url:
        return {"what": f"Triton at {args.url} (already serving)",
                **measure_triton(args.url, args, work, args.metrics_url or None)}
    from flux2_klein.repository import build_repository
    from flux2_klein.triton_config import Batching

    start = time.perf_counter()
    gpu = args.device == "gpu"
    precision = args.precision if gpu else None
    # Warm what this run sends and no more: its one size, the DiT rows its concurrency brings, no references
    # (so the VAE encoder warms nothing). A CPU rehearsal compiles with the eager backend, so it warms too.
    dtype = dtype or DEVICE_DTYPES[args.device]
    repo = build_repository(args.checkpoint, work / f"{tag}-repository", runtime="torch", device=args.device,
                            dtype=dtype, compile=args.compile or False, precision=precision,
                            fp8_text_encoder=args.fp8_text_encoder and gpu,
                            warm_sizes=f"{args.size[0]}x{args.size[1]}" if gpu or args.compile else "",
                            warm_references=0,
                            batching=Batching(max_requests=max(args.concurrency), max_dit_rows=dit_rows(args),
                                              queue_delay_us=args.batch_delay_us))
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    server = start_triton(repo, args, log_name=f"{tag}-tritonserver.log")
    ready_s = time.perf_counter() - start
    head = {"what": "Triton (measuring)", "build_s": build_s, "ready_s": ready_s}
    try:
        result = measure_triton(server.url("http"), args, work, f"{server.address}:{server.metrics_port}",
                                lambda part: save({**head, **part}), tag)
    finally:
        server.stop()
    log = (work / f"{tag}-tritonserver.log").read_text(errors="replace")
    ours = [line.split("flux2-klein ", 1)[1] for line in log.splitlines() if line.startswith("flux2-klein ")]
    loads = [line for line in ours if " loaded in " in line]
    result["leaf_totals"] = [line for line in ours if ": served " in line]  # each leaf's own count at its unload
    build = json.loads((repo / "build.json").read_text())
    if tag == "triton":
        result["guardrail_cost"] = guardrail_cost(repo, work)
    return {"what": f"Triton, leaves in PyTorch {gpu_report.version('torch')}, {dtype}, {build['boundary']} boundary"
                    + (", DiT GEMMs FP8" if "transformer" in build.get("fp8", []) else "")
                    + (", text encoder GEMMs FP8" if "text_encoder" in build.get("fp8", []) else "")
                    + (f", torch.compile {args.compile}" if args.compile else ", eager"),
            "build_s": build_s, "ready_s": ready_s, "leaf_loads": loads, "batching": build["batching"],
            "compile_backend": os.environ.get("FLUX2_KLEIN_COMPILE_BACKEND") or "inductor", **result}


def guardrail_cost(repo: Path, work: Path) -> dict:
    """What the repository's guardrail costs per request, on this run's prompts and first image (in process:
    the same checks preprocess and the safety model run)."""
    from flux2_klein.guardrail.core import Guardrail
    from flux2_klein.guardrail.cost import measure_cost
    from flux2_klein.guardrail.repository import load

    settings, sources = load(repo / "preprocess")
    image = work / "triton_image0.npy"
    images = [np.load(image)] if image.exists() else []
    return {"settings": settings.to_dict(),
            **measure_cost(Guardrail(settings, sources), [p for p, _ in prompts("sequential", 8)], images)}


# ------------------------------------------------------------------------------------------------ check

STUB_PROBE = """
import sys, numpy, torch, diffusers, transformers, flux2_klein.torch_runtime, flux2_klein.sampler_io
assert int(numpy.__version__.split(".")[0]) < 2, f"numpy {numpy.__version__}: the stub needs numpy 1.x (--stub-site)"
assert not DEVICE_GPU or torch.cuda.is_available(), "torch sees no GPU"
if FP8:
    import torchao
print("python", sys.version.split()[0], "| numpy", numpy.__version__, "| torch", torch.__version__,
      "| diffusers", diffusers.__version__, "| transformers", transformers.__version__)
"""


def check(args) -> None:
    """Seconds, before anything long: tritonserver and its stub, libpython, the models' environment."""
    install = triton_install()
    print(f"tritonserver: {install.binary}")
    libdir = _libpython_dir()
    print(f"libpython{sys.version_info.major}.{sys.version_info.minor}: {libdir or 'found by the loader'}")
    python = models_env(args)
    fp8 = args.device == "gpu" and (args.precision == "fp8" or args.fp8_text_encoder)
    probe = f"DEVICE_GPU = {args.device == 'gpu'}\nFP8 = {fp8}\n" + STUB_PROBE
    r = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, text=True, cwd=args.work)
    if r.returncode != 0:
        raise RuntimeError(f"the Triton models' environment ({python}) is not usable:\n{r.stderr[-3000:]}")
    print(f"models' environment: {r.stdout.strip()}")
    import gpu_report

    print(f"machine: {gpu_report.machine(args.device)['device']}")


# ------------------------------------------------------------------------------------------------ command

def _levels(text: str) -> list[int]:
    try:
        levels = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"concurrency: {text!r} is not a comma-separated list of integers") from None
    if levels[0] < 1:
        raise argparse.ArgumentTypeError("concurrency: levels must be at least 1")
    return levels


PHASES = ("all", "check", "smoke", "diffusers", "diffusers-compiled", "triton", "report")
# The phases with results, in report order; `all` runs them in this order (smoke first: it fails fast).
MEASURED = ("smoke", "diffusers", "diffusers-compiled", "triton")
# One line per phase run (name, status, seconds), appended by `all` and by bench/gpu_hopper.sh.
PHASE_LOG = "phases.tsv"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=PHASES, help="what to run (all: every phase in order)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint in diffusers layout (default with --tiny: WORK/tiny)")
    p.add_argument("--tiny", action="store_true", help="make a tiny random checkpoint first (a CPU rehearsal)")
    p.add_argument("--work", type=Path, required=True, help="folder for the repository, logs, images, results")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="gpu: bf16 on cuda; cpu: fp32 (default gpu)")
    p.add_argument("--size", type=size_argument, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    p.add_argument("--requests", type=int, default=6, help="timed images one at a time (default 6)")
    p.add_argument("--concurrency", type=_levels, default=[1, 2, 4, 8],
                   help="levels for images/s, comma-separated (default 1,2,4,8)")
    p.add_argument("--rounds", type=int, default=3, help="timed batches (diffusers) or requests per client (Triton) "
                                                         "at each level (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed images first, on each side (default 2)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp8", help="Triton's DiT GEMMs (default fp8)")
    p.add_argument("--fp8-text-encoder", action="store_true", help="Triton's text encoder GEMMs in FP8 too")
    p.add_argument("--compile", default="default", help="torch.compile mode for Triton's leaves ('' for eager)")
    p.add_argument("--diffusers-compile", default="default",
                   help="torch.compile mode for the compiled diffusers phase ('' skips that phase)")
    p.add_argument("--batch-delay-us", type=int, default=0, help="the sampler's dynamic-batching delay (default 0)")
    p.add_argument("--url", default="", help="measure a Triton already serving at HOST:PORT (HTTP) instead")
    p.add_argument("--metrics-url", default="", help="with --url: its metrics port HOST:PORT, for the leaves' "
                                                     "network times and compiles")
    p.add_argument("--stub-site", type=Path, action="append", default=[],
                   help="a folder of packages the Triton models import before all others (repeatable; numpy 1.x)")
    p.add_argument("--ready-timeout", type=float, default=480, help="seconds for tritonserver to load (default 480)")
    p.add_argument("--report-dir", type=Path, help="also write the report, both first images and the server log here")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.phase != "check":
        if not args.tiny:
            parser.error("--checkpoint is required (or --tiny to make one)")
        args.checkpoint = args.work / "tiny"
    for name in ("requests", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0 or args.batch_delay_us < 0:
        parser.error("--warmup and --batch-delay-us must be at least 0")
    if args.device == "cpu":  # a rehearsal: no FP8 (needs compute capability 8.9), no compile (minutes on a CPU)
        args.precision, args.fp8_text_encoder = "bf16", False
    return args


def log_phase(work: Path, phase: str, status: str, seconds: float) -> None:
    with open(work / PHASE_LOG, "a") as f:
        f.write(f"{phase}\t{status}\t{seconds:.0f}\n")


def _phase_in_child(phase: str, argv: list[str], work: Path) -> None:
    """Run one phase in a fresh interpreter (the accelerator's memory is all its own); it writes WORK/<phase>.json
    as it goes. A failed phase is logged and the next one runs."""
    started = time.perf_counter()
    rc = subprocess.run([sys.executable, os.path.abspath(__file__), phase, *argv]).returncode
    seconds = time.perf_counter() - started
    log_phase(work, phase, "ok" if rc == 0 else f"failed (exit {rc})", seconds)
    print(f"{phase}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s", flush=True)


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a phase killed mid-write leaves its last complete result."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def compiled_after_warm_up(result: dict) -> dict[str, int]:
    """The leaves that compiled anything for a request (leaf_timing's counter), from a triton/smoke result."""
    return {m: n for m, n in result.get("compiles_after_warm_up", {}).items() if n}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    result_file = None
    if "--result" in argv:  # internal: a phase run by `all` in a child process
        i = argv.index("--result")
        result_file = Path(argv[i + 1])
        del argv[i:i + 2]
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()
    if args.phase == "check":
        check(args)
        return 0
    args.checkpoint = Path(args.checkpoint).resolve()
    if args.tiny and not (args.checkpoint / "model_index.json").exists():
        from flux2_klein.tiny import make_tiny

        make_tiny(args.checkpoint)
    if args.phase in MEASURED:
        out = result_file or args.work / f"{args.phase}.json"
        save = lambda part: _write_json(out, {**part, "partial": True})  # noqa: E731
        runners = {"smoke": lambda: run_triton(args, save, tag="smoke", dtype="bf16"),
                   "diffusers": lambda: run_diffusers(args, compiled=False, save=save),
                   "diffusers-compiled": lambda: run_diffusers(args, compiled=True, save=save),
                   "triton": lambda: run_triton(args, save)}
        out.unlink(missing_ok=True)
        result = runners[args.phase]()
        _write_json(out, result)
        print(f"{args.phase}: result in {out}", flush=True)
        compiled = compiled_after_warm_up(result)
        if compiled and args.compile:
            print(f"{args.phase}: requests compiled after warm-up: {compiled}", file=sys.stderr)
            return 3
        return 0
    if args.phase == "all":
        rest = [a for a in argv if a != "all"]
        if not args.url:
            check(args)
        for phase in ("diffusers", "diffusers-compiled", "triton"):
            if phase == "diffusers-compiled" and not args.diffusers_compile:
                continue
            _phase_in_child(phase, rest, args.work)
    # the report: from the result files the phases left in WORK (those of a phase cut short too)
    results = {phase: json.loads((args.work / f"{phase}.json").read_text()) for phase in MEASURED
               if (args.work / f"{phase}.json").exists()}
    import gpu_report

    steps, guidance = checkpoint_defaults(args.checkpoint)
    report = gpu_report.build(results, args, steps, guidance)
    print(report.text, flush=True)
    gpu_report.save(report, args.work, args.report_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
