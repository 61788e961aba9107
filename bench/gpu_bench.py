#!/usr/bin/env python3
"""FLUX.2 [klein] served by Triton with PyTorch leaves, against diffusers' Flux2KleinPipeline, in one run.

    python bench/gpu_bench.py all --checkpoint CKPT --work DIR [--device gpu] [--size 1024x1024]
                                  [--requests 8] [--concurrency 4] [--concurrent-requests 16] [--warmup 2]
                                  [--compile MODE] [--report-dir DIR]
    python bench/gpu_bench.py all --tiny --device cpu --work DIR ...    a CPU smoke run on a tiny checkpoint

`all` runs four phases; the two that use the accelerator each run in a process of their own, so that each
finds the GPU's memory free:
  check      seconds: tritonserver and its Python-backend stub, libpython, and the Triton models' own
             environment (see make_stub_env; --stub-site puts numpy 1.x first there).
  diffusers  the pipeline itself (bf16 on a GPU, fp32 on a CPU): seconds per image, one call per image; and
             images/s with a batch of --concurrency prompts per call (the pipeline's own way to serve several).
  triton     the same checkpoint built as `flux2-klein build --runtime torch --device ...`, served by
             tritonserver: seconds per image at concurrency 1, images/s at concurrency --concurrency (HTTP).
  report     both side by side, the ratios, the machine (the GPU's exact name from nvidia-smi); report.json.
Both sides get the same prompts and seeds (prompt i with seed i, the steps and guidance of the checkpoint);
warm-up requests use other prompts, and the concurrency phase yet others, so Triton's response cache never
answers a timed request. The first timed image of each side is kept; the report gives their largest
difference per channel value (bf16 kernels differ: information, not a test). `--url` measures a Triton that
is already serving instead of building and starting one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import socket
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

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
MODEL = "flux2_klein"
DTYPES = {"gpu": "bf16", "cpu": "fp32"}
# Triton's pool for GPU tensors handed between models (default 64 MB): a prompt embedding is 16 MB, and
# several requests are in flight at once.
CUDA_POOL_BYTES = 2 << 30


# ------------------------------------------------------------------------------------------------ workload

def prompts(tag: str, n: int) -> list[tuple[str, int]]:
    """(prompt, seed) pairs; each phase has its own tag, so no timed prompt was seen before."""
    return [(f"{PROMPT}, {tag} {i}", i) for i in range(n)]


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size: {text!r} is not WIDTHxHEIGHT") from None
    return w, h


def checkpoint_defaults(ckpt: Path) -> tuple[int, float]:
    from flux2_klein.checkpoint import load_checkpoint

    c = load_checkpoint(ckpt)
    return c.default_steps, c.default_guidance


def summary(latencies: list[float]) -> dict:
    xs = sorted(latencies)
    return {"n": len(xs), "p50": statistics.median(xs), "mean": statistics.fmean(xs), "min": xs[0], "max": xs[-1]}


# ------------------------------------------------------------------------------------------------ diffusers

def run_diffusers(args) -> dict:
    import torch
    from diffusers import Flux2KleinPipeline

    from flux2_klein.export.onnx_export import DTYPES as TORCH_DTYPES

    gpu = args.device == "gpu"
    device = "cuda" if gpu else "cpu"
    dtype = DTYPES[args.device]
    steps, guidance = checkpoint_defaults(args.checkpoint)
    width, height = args.size

    start = time.perf_counter()
    pipe = Flux2KleinPipeline.from_pretrained(args.checkpoint, dtype=TORCH_DTYPES[dtype]).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def call(batch: list[tuple[str, int]]) -> tuple[float, list[np.ndarray]]:
        generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
        sync()
        t = time.perf_counter()
        out = pipe(prompt=[p for p, _ in batch], height=height, width=width, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generators)
        sync()
        return time.perf_counter() - t, [np.asarray(im) for im in out.images]

    with torch.inference_mode():
        for job in prompts("warm-up", args.warmup):
            call([job])
        latencies, first = [], None
        for job in prompts("sequential", args.requests):
            seconds, images = call([job])
            latencies.append(seconds)
            first = images[0] if first is None else first
        c = args.concurrency
        batches = max(1, args.concurrent_requests // c)
        if args.warmup:
            call(prompts("warm-up batch", c))
        jobs = prompts("concurrent", batches * c)
        batch_seconds = [call(jobs[i * c:(i + 1) * c])[0] for i in range(batches)]
    np.save(Path(args.work) / "diffusers_image0.npy", first)
    return {
        "what": f"diffusers {_version('diffusers')} Flux2KleinPipeline, {dtype}, {device}",
        "load_s": load_s,
        "latency_s": summary(latencies),
        "throughput": {"concurrency": c, "how": f"batch of {c} prompts per call", "images": batches * c,
                       "seconds": sum(batch_seconds), "images_per_s": batches * c / sum(batch_seconds)},
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
    }


# ------------------------------------------------------------------------------------------------ triton

def infer(url: str, prompt: str, seed: int, size: tuple[int, int], steps: int, guidance: float,
          timeout_s: float = 600) -> np.ndarray:
    """One image from the ensemble over Triton's HTTP protocol (JSON in, binary image out); stdlib only."""
    width, height = size
    body = {
        "inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [prompt]},
            {"name": "height", "datatype": "INT32", "shape": [1], "data": [height]},
            {"name": "width", "datatype": "INT32", "shape": [1], "data": [width]},
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [seed]},
            {"name": "num_inference_steps", "datatype": "INT32", "shape": [1], "data": [steps]},
            {"name": "guidance_scale", "datatype": "FP32", "shape": [1], "data": [guidance]},
        ],
        "outputs": [{"name": "image", "parameters": {"binary_data": True}}],
    }
    request = urllib.request.Request(f"http://{url}/v2/models/{MODEL}/infer", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            raw = r.read()
            header_length = int(r.headers.get("Inference-Header-Content-Length", len(raw)))
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{MODEL}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
    header = json.loads(raw[:header_length])
    (output,) = header["outputs"]
    return np.frombuffer(raw[header_length:], dtype=np.uint8).reshape(output["shape"])


def measure_triton(url: str, args, work: Path) -> dict:
    steps, guidance = checkpoint_defaults(args.checkpoint)

    def one(job):
        t = time.perf_counter()
        image = infer(url, job[0], job[1], args.size, steps, guidance)
        return time.perf_counter() - t, image

    c = args.concurrency
    for job in prompts("warm-up", args.warmup):
        one(job)
    if args.warmup:
        with ThreadPoolExecutor(c) as pool:  # every instance runs once before anything is timed
            list(pool.map(one, prompts("warm-up batch", c)))
    latencies, first = [], None
    for job in prompts("sequential", args.requests):
        seconds, image = one(job)
        latencies.append(seconds)
        first = image if first is None else first
    n = max(1, args.concurrent_requests // c) * c
    with ThreadPoolExecutor(c) as pool:
        start = time.perf_counter()
        results = list(pool.map(one, prompts("concurrent", n)))
        wall = time.perf_counter() - start
    np.save(work / "triton_image0.npy", first)
    return {
        "latency_s": summary(latencies),
        "throughput": {"concurrency": c, "how": f"{c} clients at once", "images": n, "seconds": wall,
                       "images_per_s": n / wall, "latency_s": summary([s for s, _ in results])},
    }


def _libpython_dir() -> str | None:
    """Where libpythonX.Y.so.1.0 lies: the bundled Python-backend stub links it, and a Python built static
    (Debian's, Ubuntu's) has it only as a separate library. None when the loader finds it unaided."""
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    import sysconfig

    dirs = [sysconfig.get_config_var("LIBDIR"), os.path.join(sys.base_prefix, "lib"),
            "/usr/lib/x86_64-linux-gnu", "/usr/local/lib", "/lib/x86_64-linux-gnu"]
    for d in filter(None, dirs):
        if (Path(d) / name).exists():
            return d
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    except OSError:
        cache = ""
    if name in cache:
        return None
    raise FileNotFoundError(f"{name}: not on this machine; the Triton Python-backend stub for "
                            f"Python {sys.version_info.major}.{sys.version_info.minor} needs it")


def make_stub_env(target: Path, first: list[Path] = ()) -> Path:
    """A Python environment for the Triton Python models: `first`, then everything this process imports from.

    The Python-backend stub runs its interpreter isolated (PYTHONPATH ignored) in the environment of the
    first `python3` on PATH; that is this environment, a venv of this interpreter whose site-packages holds
    a .pth adding, in order, the folders `first` (e.g. numpy 1.x: the stub is built for numpy 1, and its
    BYTES tensors come out garbled under numpy 2), this process's PYTHONPATH and its own site-packages.
    scipy is hidden there: transformers imports it when it can, nothing served uses it, and a scipy built
    for numpy 2 fails to import beside numpy 1. Returns the environment's python3.
    """
    import site
    import venv

    venv.EnvBuilder(clear=True, symlinks=True, with_pip=False).create(target)
    python = Path(target) / "bin" / "python3"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    chain = [str(Path(d).resolve()) for d in first]
    chain += [os.path.abspath(d) for d in os.environ.get("PYTHONPATH", "").split(os.pathsep) if d]
    chain += [d for d in site.getsitepackages() if os.path.isdir(d)]
    lines = ["import site; " + "; ".join(f"site.addsitedir({d!r})" for d in chain),
             "import sys; sys.modules.setdefault('scipy', None)"]
    (Path(purelib) / "zz_flux2_klein_stub_env.pth").write_text("\n".join(lines) + "\n")
    return python


def triton_install():
    """flux2_klein.server's tritonserver (PATH, /opt/tritonserver, or the nvidia-pytriton wheel's)."""
    from flux2_klein import server

    try:
        return server.find_tritonserver()
    except FileNotFoundError:
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise
    # pytriton's __init__ imports its own client stack (tritonclient, zmq, sh, ...), which a machine with
    # only the carried wheel lacks; find_tritonserver needs nothing of it but the package's place.
    shim = types.ModuleType("pytriton")
    shim.__file__ = str(Path(next(iter(spec.submodule_search_locations))) / "__init__.py")
    sys.modules["pytriton"] = shim
    try:
        return server.find_tritonserver()
    finally:
        del sys.modules["pytriton"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    def __init__(self, message: str, exited: bool):
        super().__init__(message)
        self.exited = exited


class Triton:
    """tritonserver on a repository, in the background, its log in a file."""

    def __init__(self, repo: Path, log_path: Path, gpu: bool, stub_python: Path | None = None):
        from flux2_klein.server import server_command

        install = triton_install()
        env = {**os.environ, **install.env}
        if stub_python is not None:  # the models' environment: the python3 first on PATH
            env["PATH"] = os.pathsep.join([str(Path(stub_python).parent), env["PATH"]])
        libdir = _libpython_dir()
        if libdir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
        self.http_port = _free_port()
        extra = (f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}",) if gpu else ()
        cmd = server_command(install, Path(repo).resolve(), self.http_port, _free_port(), _free_port(), extra)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # The stubs put their working folder first on sys.path: not a checkout's raw flux2_klein/ folder.
        self.process = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=log_path.parent)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def wait_ready(self, timeout_s: float) -> None:
        from flux2_klein.server import wait_ready

        if not wait_ready(self.http_port, self.process, timeout_s):
            exited = self.process.poll() is not None
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-6000:]
            what = "exited while loading" if exited else f"was not ready in {timeout_s:.0f} s"
            raise ServerError(f"tritonserver {what}; its log ends:\n{tail}", exited)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


STUB_PROBE = """
import sys, numpy, torch, diffusers, transformers, flux2_klein.model_repository
assert int(numpy.__version__.split(".")[0]) < 2, f"numpy {numpy.__version__}: the stub needs numpy 1.x (--stub-site)"
assert not DEVICE_GPU or torch.cuda.is_available(), "torch sees no GPU"
print("python", sys.version.split()[0], "| numpy", numpy.__version__, "| torch", torch.__version__,
      "| diffusers", diffusers.__version__, "| transformers", transformers.__version__)
"""


def check(args) -> None:
    """Seconds, before anything long: tritonserver and its stub, libpython, the models' environment."""
    install = triton_install()
    print(f"tritonserver: {install.binary}")
    libdir = _libpython_dir()
    print(f"libpython{sys.version_info.major}.{sys.version_info.minor}: {libdir or 'found by the loader'}")
    python = make_stub_env(Path(args.work) / "stub-env", args.stub_site)
    # As the stub runs it: isolated (-I), from a folder that is no checkout.
    probe = f"DEVICE_GPU = {args.device == 'gpu'}\n" + STUB_PROBE
    r = subprocess.run([str(python), "-I", "-c", probe], capture_output=True, text=True, cwd=args.work)
    if r.returncode != 0:
        raise RuntimeError(f"the Triton models' environment ({python}) is not usable:\n{r.stderr[-3000:]}")
    print(f"models' environment: {r.stdout.strip()}")
    print(f"machine: {machine(args.device)['device']}")


def run_triton(args) -> dict:
    work = Path(args.work)
    if args.url:
        return {"what": f"Triton at {args.url} (already serving)", **measure_triton(args.url, args, work)}
    from flux2_klein.repository import build_repository

    start = time.perf_counter()
    repo = build_repository(args.checkpoint, work / "repository", runtime="torch", device=args.device,
                            dtype=DTYPES[args.device], compile=args.compile or False)
    build_s = time.perf_counter() - start
    stub_python = make_stub_env(work / "stub-env", args.stub_site)
    for attempt in (1, 2):
        # The Python backend now and then aborts while many stubs start at once (boost lock_exception,
        # a known Triton issue): one more start, the first log kept.
        log = work / ("tritonserver.log" if attempt == 1 else "tritonserver-2.log")
        server = Triton(repo, log, gpu=args.device == "gpu", stub_python=stub_python)
        try:
            start = time.perf_counter()
            server.wait_ready(args.ready_timeout)
            break
        except ServerError as e:
            if attempt == 2 or not e.exited:
                raise
            print(f"tritonserver exited while loading, starting it again; {log} ends:\n{str(e)[-1500:]}",
                  flush=True)
    try:
        ready_s = time.perf_counter() - start
        result = measure_triton(server.url, args, work)
    finally:
        server.stop()
    compiled = f", torch.compile {args.compile}" if args.compile else ""
    return {"what": f"Triton (tritonserver {_triton_version(work / 'tritonserver.log')}), leaves in PyTorch "
                    f"{_version('torch')}, {DTYPES[args.device]}{compiled}",
            "build_s": build_s, "ready_s": ready_s, **result}


def _triton_version(log: Path) -> str:
    try:
        for line in log.read_text(errors="replace").splitlines():
            if "server_version" in line:
                return line.split("|")[2].strip() if line.count("|") >= 3 else line.strip()
    except OSError:
        pass
    return "?"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


# ------------------------------------------------------------------------------------------------ report

def machine(device: str) -> dict:
    if device == "gpu":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=60).stdout
            name, driver, memory = (s.strip() for s in out.splitlines()[0].split(","))
            return {"device": name, "driver": driver, "memory": memory}
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return {"device": "GPU (nvidia-smi gave no name)"}
    return {"device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"}


def report(results: dict, work: Path) -> str:
    d, t = results["diffusers"], results["triton"]
    lines = [
        f"FLUX.2 [klein] {results['size']}, {results['steps']} steps, guidance {results['guidance']:g}, "
        f"{results['dtype']}; checkpoint {results['checkpoint']}",
        f"machine: {results['machine']['device']}"
        + (f", driver {results['machine']['driver']}, {results['machine']['memory']}"
           if "driver" in results["machine"] else ""),
        f"diffusers: {d['what']}",
        f"triton:    {t['what']}",
        "",
        f"{'':34}{'diffusers':>16}{'Triton':>16}{'Triton/diffusers':>20}",
    ]
    dl, tl = d["latency_s"]["p50"], t["latency_s"]["p50"]
    c = t["throughput"]["concurrency"]
    di, ti = d["throughput"]["images_per_s"], t["throughput"]["images_per_s"]
    lines += [
        f"{'latency, 1 at a time (s, median)':34}{dl:>16.3f}{tl:>16.3f}{tl / dl:>19.2f}x",
        f"{f'images/s, {c} at a time':34}{di:>16.3f}{ti:>16.3f}{ti / di:>19.2f}x",
        f"  (diffusers: {d['throughput']['how']}; Triton: {t['throughput']['how']}, "
        f"{t['throughput']['images']} images)",
    ]
    results["ratios"] = {"latency_triton_over_diffusers": tl / dl, "images_per_s_triton_over_diffusers": ti / di}
    a, b = work / "diffusers_image0.npy", work / "triton_image0.npy"
    if a.exists() and b.exists():
        x, y = np.load(a), np.load(b)
        if x.shape == y.shape:
            diff = np.abs(x.astype(int) - y.astype(int))
            results["first_image_difference"] = {"max": int(diff.max()), "mean": float(diff.mean())}
            lines.append(f"first image, Triton against diffusers: largest difference {int(diff.max())}, "
                         f"mean {float(diff.mean()):.3f} per channel value")
        else:
            lines.append(f"first image: shapes differ, diffusers {x.shape} and Triton {y.shape}")
    return "\n".join(lines)


def _save_outputs(results: dict, text: str, work: Path, report_dir: Path | None) -> None:
    from PIL import Image

    (work / "report.json").write_text(json.dumps(results, indent=1))
    (work / "report.txt").write_text(text + "\n")
    if report_dir is None:
        return
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.json").write_text(json.dumps(results, indent=1))
    (report_dir / "report.txt").write_text(text + "\n")
    for side in ("diffusers", "triton"):
        npy = work / f"{side}_image0.npy"
        if npy.exists():
            Image.fromarray(np.load(npy)).save(report_dir / f"{side}_image0.png")
    log = work / "tritonserver.log"
    if log.exists():  # its end: what went wrong, if anything did
        data = log.read_bytes()
        (report_dir / "tritonserver.log").write_bytes(data[-(4 << 20):])


# ------------------------------------------------------------------------------------------------ command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=("all", "check", "diffusers", "triton", "report"),
                   help="what to run (check: the seconds-long preflight that `all` starts with)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint in diffusers layout (default with --tiny: WORK/tiny)")
    p.add_argument("--tiny", action="store_true", help="make a tiny random checkpoint first (a CPU smoke run)")
    p.add_argument("--work", type=Path, required=True, help="folder for the repository, logs, images, results")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                   help="gpu: bf16 on cuda, KIND_GPU instances; cpu: fp32 (default gpu)")
    p.add_argument("--size", type=parse_size, default=(1024, 1024), help="WIDTHxHEIGHT (default 1024x1024)")
    p.add_argument("--requests", type=int, default=8, help="timed images at concurrency 1 (default 8)")
    p.add_argument("--concurrency", type=int, default=4, help="requests at once for images/s (default 4)")
    p.add_argument("--concurrent-requests", type=int, default=16,
                   help="timed images at that concurrency, rounded down to a multiple of it (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="untimed images first, on each side (default 2)")
    p.add_argument("--compile", default="", help="torch.compile mode for Triton's leaves (default: eager)")
    p.add_argument("--url", default="", help="measure a Triton already serving at HOST:PORT (HTTP) instead")
    p.add_argument("--stub-site", type=Path, action="append", default=[],
                   help="a folder of packages that Triton's Python models import before all others "
                        "(repeatable; e.g. numpy 1.x installed with pip --target)")
    p.add_argument("--ready-timeout", type=float, default=480, help="seconds for tritonserver to load (default 480)")
    p.add_argument("--report-dir", type=Path, help="also copy the report, both first images and the server log here")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.checkpoint is None and args.phase != "check":
        if not args.tiny:
            build_parser().error("--checkpoint is required (or --tiny to make one)")
        args.checkpoint = args.work / "tiny"
    for name in ("requests", "concurrency", "concurrent_requests"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        build_parser().error("--warmup must be at least 0")
    return args


def _phase_in_child(phase: str, argv: list[str], out: Path) -> dict:
    """Run one phase in a fresh interpreter (the accelerator's memory is all its own), its result as JSON."""
    cmd = [sys.executable, os.path.abspath(__file__), phase, *argv, "--result", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


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
    if args.phase in ("diffusers", "triton"):
        result = run_diffusers(args) if args.phase == "diffusers" else run_triton(args)
        text = json.dumps(result, indent=1)
        if result_file is not None:
            result_file.write_text(text)
        else:
            print(text)
        return 0

    if args.phase == "all":
        rest = list(argv)
        rest.remove("all")  # the children get every option, and their own phase
        steps, guidance = checkpoint_defaults(args.checkpoint)
        if not args.url:
            check(args)
        started = time.perf_counter()
        diffusers = _phase_in_child("diffusers", rest, args.work / "diffusers.json")
        print(f"diffusers: done in {time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        triton = _phase_in_child("triton", rest, args.work / "triton.json")
        print(f"triton: done in {time.perf_counter() - started:.0f} s", flush=True)
    else:  # report: from the two result files an earlier run left in WORK
        steps, guidance = checkpoint_defaults(args.checkpoint)
        diffusers = json.loads((args.work / "diffusers.json").read_text())
        triton = json.loads((args.work / "triton.json").read_text())
    results = {
        "size": f"{args.size[0]}x{args.size[1]}", "steps": steps, "guidance": guidance,
        "dtype": DTYPES[args.device], "checkpoint": str(args.checkpoint), "machine": machine(args.device),
        "python": platform.python_version(), "torch": _version("torch"), "diffusers": diffusers, "triton": triton,
    }
    text = report(results, args.work)
    print(text, flush=True)
    _save_outputs(results, text, args.work, args.report_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
