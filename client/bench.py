"""`flux2-klein bench`: load the Triton model `flux2_klein` at a range of concurrencies and report.

    flux2-klein bench --url HOST:PORT [--concurrency 1:8] [--sizes 1024x1024,...] [--references N]
                      [--requests N] [--repository REPO] [--out DIR]

For each concurrency level it writes perf_analyzer's input data (distinct prompts and seeds, the sizes in
turn, N reference images per request), runs perf_analyzer over gRPC at that level (a fixed number of
requests, `--request-count`, or with --windows perf_analyzer's stabilising count windows), reads
perf_analyzer's verbose CSV for the client's view (p50/p90/p99 and mean latency; images/s as concurrency /
mean latency, see `perf_analyzer_level` for why not perf_analyzer's own figure) and Triton's statistics
API before and after the level for the server's (queue and compute time of every model: the ensemble,
preprocess, text_encoder, sampler, transformer, vae_decoder, vae_encoder).

Serving overhead, two ways:
  (a) on the server: the client's end-to-end latency against the sum of the leaf models' compute time per
      request (preprocess, text_encoder, transformer x steps, vae_encoder x references, vae_decoder);
  (b) against no server at all: with --repository (the folder the server loaded, on this machine) the
      same graphs run in this process through `flux2_klein.direct.DirectPipeline`, one request after
      another: latency at concurrency 1, and images/s of N sequential requests against Triton's at N.
Goals, reported and not enforced: under 5 ms of overhead per request, and more images/s than the direct
loop at concurrency >= 2.

Writes to --out: report.md (Markdown tables), report.json (every number), report.png (latency p50/p90/p99
and images/s against concurrency), and per level the input data, perf_analyzer's CSV and its log.
Where no perf_analyzer runs (see flux2_klein.client.perf_analyzer), `--load auto` measures with
tritonclient threads instead and the report says so and why.
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import platform
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from flux2_klein.sizes import MAX_REFERENCES, SIZES, size_names

MODEL = "flux2_klein"
# The ensemble, then its steps, then what the sampler calls by BLS.
MODELS = (MODEL, "preprocess", "text_encoder", "sampler", "transformer", "vae_decoder", "vae_encoder")
# The models whose compute is the request's work; the sampler's own time (loop math and the BLS round
# trips around its transformer/vae_encoder calls) is reported apart.
LEAVES = ("preprocess", "text_encoder", "transformer", "vae_encoder", "vae_decoder")
OVERHEAD_GOAL_MS = 5.0
PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a red fox in fresh snow, telephoto photograph",
    "an isometric city block made of paper, soft light",
    "a bowl of ramen on a wooden table, steam rising",
    "a watercolor map of an imaginary archipelago",
    "a robot tending a rooftop garden at sunrise",
    "macro photograph of a dew-covered spider web",
    "a neon-lit alley in the rain, cinematic",
)


class BenchError(RuntimeError):
    """The benchmark could not run (server unreachable, perf_analyzer failed, ...); str() says why."""


# ------------------------------------------------------------------------------------------- arguments


def parse_concurrency(text: str) -> list[int]:
    """'1:8' (start:end[:step], as perf_analyzer's --concurrency-range), '4', or '1,2,4,8' -> levels."""
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, end, step = parts[0], parts[1], parts[2] if len(parts) == 3 else 1
            levels = list(range(start, end + 1, step)) if step > 0 else []
        else:
            levels = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        levels = []
    if not levels or any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"expected START:END[:STEP] or a list like 1,2,4 of levels >= 1; got {text!r}")
    return sorted(set(levels))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    from .generate import parse_size

    sizes = [parse_size(s) for s in text.split(",") if s.strip()]
    bad = [f"{w}x{h}" for w, h in sizes if (w, h) not in SIZES]
    if not sizes or bad:
        raise argparse.ArgumentTypeError(f"unsupported size(s) {', '.join(bad) or repr(text)}; allowed: {size_names()}")
    return sizes


def parse_references(text: str) -> int:
    n = int(text)
    if not 0 <= n <= MAX_REFERENCES:
        raise argparse.ArgumentTypeError(f"--references must be 0..{MAX_REFERENCES}; got {n}")
    return n


def _reference_size(text: str) -> tuple[int, int]:
    from .generate import parse_size

    return parse_size(text)


@dataclass
class BenchConfig:
    url: str = "localhost:8001"
    concurrency: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8])
    sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 1024)])
    references: int = 0
    reference_size: tuple[int, int] = (1024, 1024)
    steps: int | None = None
    requests: int = 4  # per concurrency slot: a level measures requests x concurrency requests
    windows: bool = False
    stability: int = 20
    warmup: int = 2  # rounds: the first requests an ONNX Runtime session sees are slower (its arena grows)
    repository: Path | None = None
    direct: bool = True
    direct_threads: int | None = None
    load: str = "auto"  # auto | perf_analyzer | python
    out: Path = Path("out/bench")
    timeout_s: float | None = None  # per level
    progress: bool = True


# ------------------------------------------------------------------------------------------ the inputs


def reference_image(index: int, width: int = 1024, height: int = 1024) -> bytes:
    """A deterministic PNG (gradients and a checkerboard) to stand in for a user's reference image."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    channels = [xx * 255 // width, yy * 255 // height, ((xx // 32 + yy // 32) % 2) * 200]
    k = index % 3
    pixels = np.stack(channels[k:] + channels[:k], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Entry:
    """One request of the benchmark."""

    prompt: str
    width: int
    height: int
    seed: int
    steps: int | None = None
    references: list[bytes] = field(default_factory=list)

    def arrays(self) -> dict[str, tuple[str, np.ndarray]]:
        from .triton_client import input_arrays

        return input_arrays(self.prompt, width=self.width, height=self.height, seed=self.seed, steps=self.steps,
                            references=self.references)

    def perf_analyzer_data(self) -> dict[str, Any]:
        """This request in perf_analyzer's --input-data JSON. BYTES inputs with binary content go as
        {"b64": ..., "shape": [N]}: perf_analyzer sends the decoded bytes as the tensor's raw data, so
        they must already be Triton's serialized BYTES tensor (each element a 4-byte little-endian
        length, then its bytes)."""
        data: dict[str, Any] = {"prompt": [self.prompt], "height": [self.height], "width": [self.width],
                                "seed": [self.seed]}
        if self.steps is not None:
            data["num_inference_steps"] = [self.steps]
        if self.references:
            raw = b"".join(struct.pack("<I", len(r)) + r for r in self.references)
            data["reference_images"] = {"b64": base64.b64encode(raw).decode("ascii"), "shape": [len(self.references)]}
        return data


def make_entries(count: int, sizes, references: list[bytes], salt: str, steps: int | None = None) -> list[Entry]:
    """`count` requests, each with its own prompt (salted, so the text encoder's response cache does not
    turn later levels into cache hits) and seed, the sizes taken in turn."""
    return [Entry(f"{PROMPTS[i % len(PROMPTS)]} [{salt}-{i}]", *sizes[i % len(sizes)], seed=i, steps=steps,
                  references=list(references)) for i in range(count)]


# ------------------------------------------------------------------------------------------- statistics


def _ns(stat: dict | None) -> tuple[int, int]:
    stat = stat or {}
    return int(stat.get("count", 0) or 0), int(stat.get("ns", 0) or 0)


def snapshot(client) -> dict[str, dict[str, int]]:
    """Triton's cumulative statistics of every model (all versions summed): counts and nanoseconds."""
    raw = client.get_inference_statistics(model_name="", as_json=True)
    out: dict[str, dict[str, int]] = {}
    for m in raw.get("model_stats", []):
        s = m.get("inference_stats", {})
        row = out.setdefault(m["name"], {})

        def add(key, value):
            row[key] = row.get(key, 0) + value

        add("inferences", int(m.get("inference_count", 0) or 0))
        add("executions", int(m.get("execution_count", 0) or 0))
        for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
                    "cache_hit", "cache_miss"):
            count, ns = _ns(s.get(key))
            add(f"{key}_count", count)
            add(f"{key}_ns", ns)
    return out


def settled_snapshot(client, expected: int | None = None, timeout_s: float = 30.0) -> dict[str, dict[str, int]]:
    """A snapshot once the statistics stop moving: Triton records a request's statistics as it releases
    the request, which can be just after the client has its response. `expected`: the ensemble's count of
    finished requests (success + fail) to wait for, when known."""
    deadline = time.monotonic() + timeout_s
    last = snapshot(client)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = snapshot(client)
        ens = now.get(MODEL, {})
        if now == last and (expected is None or ens.get("success_count", 0) + ens.get("fail_count", 0) >= expected):
            return now
        last = now
    return last


def delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
    return {name: {k: v - before.get(name, {}).get(k, 0) for k, v in row.items()} for name, row in after.items()}


def model_table(d: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per model, from one level's statistics delta: times per ensemble request (ms) and per call."""
    requests = max(d.get(MODEL, {}).get("success_count", 0), 1)
    table = {}
    for name in MODELS:
        row = d.get(name, {})
        calls = row.get("success_count", 0)
        compute_ns = row.get("compute_input_ns", 0) + row.get("compute_infer_ns", 0) + row.get("compute_output_ns", 0)
        table[name] = {
            "calls": calls,
            "executions": row.get("executions", 0),
            "calls_per_request": calls / requests,
            "queue_ms": row.get("queue_ns", 0) / requests / 1e6,
            "compute_ms": compute_ns / requests / 1e6,
            "compute_infer_ms": row.get("compute_infer_ns", 0) / requests / 1e6,
            "success_ms": row.get("success_ns", 0) / requests / 1e6,
            "compute_per_call_ms": compute_ns / calls / 1e6 if calls else 0.0,
            "cache_hits": row.get("cache_hit_count", 0),
            "failures": row.get("fail_count", 0),
        }
    return table


# ----------------------------------------------------------------------------------------------- progress


class Progress:
    """One line on stderr, rewritten in place on a terminal (else printed when it changes)."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = ""

    def update(self, text: str, key: str | None = None) -> None:
        """Show `text`; off a terminal only when `key` (default: the text) changed, so a ticking clock
        does not print a line a second into a log."""
        key = text if key is None else key
        if not self.enabled or (text if self.tty else key) == self._last:
            return
        self._last = text if self.tty else key
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.tty and self._last:
            self.stream.write("\n")
            self.stream.flush()
        self._last = ""


def _watch(url: str, baseline: int, total: int | None, label: str, progress: Progress, stop: threading.Event) -> None:
    """Poll the ensemble's success count once a second while a level runs."""
    import tritonclient.grpc as grpcclient

    start = time.monotonic()
    client = grpcclient.InferenceServerClient(url)
    try:
        while not stop.is_set():
            try:
                done = snapshot(client).get(MODEL, {}).get("success_count", 0) - baseline
            except Exception:  # noqa: BLE001 - progress is best effort
                done = -1
            shown = (f"{done}" if done >= 0 else "?") + (f"/{total}" if total else "")
            progress.update(f"bench: {label}: {shown} requests, {time.monotonic() - start:.0f} s",
                            key=f"{label} {shown}")
            stop.wait(1.0)
    finally:
        client.close()


# ----------------------------------------------------------------------------------------------- load


@dataclass
class LevelLoad:
    """The client's view of one level."""

    source: str  # "perf_analyzer <version>" or "tritonclient threads"
    requests: int
    wall_s: float
    throughput: float  # images/s: the estimate the report uses (see `perf_analyzer_level`)
    latency_ms: dict[str, float]  # avg, p50, p90, p95, p99
    client_ms: dict[str, float] = field(default_factory=dict)  # perf_analyzer's send / network+server / recv
    reported_throughput: float = 0.0  # what the load generator itself said


def read_perf_analyzer_csv(path: Path) -> dict[str, float]:
    """The first row of perf_analyzer's `-f` CSV (with --verbose-csv), as {column: number}."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise BenchError(f"{path}: perf_analyzer wrote no measurement")
    out = {}
    for key, value in rows[0].items():
        if key is None:
            continue
        try:
            out[key.strip()] = float(value)
        except (TypeError, ValueError):
            pass
    return out


def perf_analyzer_level(pa, cfg: BenchConfig, c: int, n: int, data_path: Path, level_dir: Path) -> LevelLoad:
    csv_path, log_path = level_dir / f"perf_analyzer-c{c}.csv", level_dir / f"perf_analyzer-c{c}.log"
    cmd = pa.command("-m", MODEL, "-u", cfg.url, "-i", "grpc", "--input-data", str(data_path),
                     "--concurrency-range", f"{c}:{c}:1", "-f", str(csv_path), "--verbose-csv")
    if cfg.windows:
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", str(n),
                "-s", str(cfg.stability), "-r", "10"]
    else:
        cmd += ["--request-count", str(n)]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        try:
            r = subprocess.run(cmd, env=pa.env, stdout=log, stderr=subprocess.STDOUT, timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"perf_analyzer at concurrency {c} ran past {cfg.timeout_s} s; its log: "
                             f"{log_path}") from None
    wall = time.perf_counter() - start
    if r.returncode != 0 or not csv_path.is_file():
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise BenchError(f"perf_analyzer failed at concurrency {c} (status {r.returncode}); "
                         f"the end of {log_path}:\n{tail}")
    row = read_perf_analyzer_csv(csv_path)
    us = lambda key: row.get(key, 0.0) / 1000.0  # noqa: E731 - perf_analyzer reports microseconds
    latency = {"avg": us("Avg latency"), "p50": us("p50 latency"), "p90": us("p90 latency"),
               "p95": us("p95 latency"), "p99": us("p99 latency")}
    reported = row.get("Inferences/Second", 0.0)
    # With --request-count, perf_analyzer (2.51 and still today) divides by a window that runs from before
    # the first request to its next 1-second poll after the last one: the clamp to the requests is computed
    # and dropped (InferenceProfiler::Summarize). For requests of a second or more that understates
    # throughput by up to a third, so a fixed-count level uses Little's law for a closed loop instead:
    # concurrency / mean latency. Stabilised windows are back to back and keep perf_analyzer's figure.
    throughput = reported if cfg.windows else _little(c, latency["avg"])
    return LevelLoad(
        source=f"perf_analyzer {pa.version}", requests=n, wall_s=wall, throughput=throughput, latency_ms=latency,
        client_ms={"send": us("Client Send"), "network_server": us("Network+Server Send/Recv"),
                   "recv": us("Client Recv")},
        reported_throughput=reported,
    )


def _little(concurrency: int, avg_latency_ms: float) -> float:
    """Throughput of a closed loop keeping `concurrency` requests in flight (Little's law), images/s."""
    return concurrency * 1000.0 / avg_latency_ms if avg_latency_ms > 0 else 0.0


def _percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return {"avg": float(ms.mean()), **{f"p{p}": float(np.percentile(ms, p)) for p in (50, 90, 95, 99)}}


def python_level(cfg: BenchConfig, c: int, entries: list[Entry]) -> LevelLoad:
    """The same load with tritonclient: `c` threads, each with its own gRPC connection, sending
    `entries` in turn until all are answered."""
    import tritonclient.grpc as grpcclient

    lock = threading.Lock()
    queue = list(reversed(entries))
    latencies: list[float] = []
    errors: list[str] = []

    def worker():
        client = grpcclient.InferenceServerClient(cfg.url)
        try:
            while True:
                with lock:
                    if not queue or errors:
                        return
                    entry = queue.pop()
                inputs = []
                for name, (datatype, array) in entry.arrays().items():
                    inp = grpcclient.InferInput(name, list(array.shape), datatype)
                    inp.set_data_from_numpy(array)
                    inputs.append(inp)
                t = time.perf_counter()
                try:
                    client.infer(MODEL, inputs, outputs=[grpcclient.InferRequestedOutput("image")],
                                 client_timeout=cfg.timeout_s)
                except Exception as e:  # noqa: BLE001
                    with lock:
                        errors.append(str(e))
                    return
                with lock:
                    latencies.append(time.perf_counter() - t)
        finally:
            client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(cfg.timeout_s)
    wall = time.perf_counter() - start
    if errors:
        raise BenchError(f"a request at concurrency {c} failed: {errors[0]}")
    if any(t.is_alive() for t in threads):
        raise BenchError(f"concurrency {c} ran past {cfg.timeout_s} s")
    latency = _percentiles(latencies)
    return LevelLoad("tritonclient threads", len(latencies), wall, _little(c, latency["avg"]), latency,
                     reported_throughput=len(latencies) / wall)


# ----------------------------------------------------------------------------------------------- direct


def run_direct(cfg: BenchConfig, entries: list[Entry], warm: list[Entry], progress: Progress) -> dict[str, Any]:
    """The same requests through DirectPipeline, one after another, in this process, after `warm`."""
    from flux2_klein.direct import STAGES, DirectPipeline

    progress.update("bench: direct: loading the repository's graphs")
    t = time.perf_counter()
    pipe = DirectPipeline(cfg.repository, intra_op_threads=cfg.direct_threads)
    load_s = time.perf_counter() - t
    for i, entry in enumerate(warm):
        progress.update(f"bench: direct: warm-up {i + 1}/{len(warm)}")
        pipe.infer({k: a for k, (_, a) in entry.arrays().items()})
    latencies, stages = [], {s: 0.0 for s in STAGES}
    start = time.perf_counter()
    for i, entry in enumerate(entries):
        progress.update(f"bench: direct: {i}/{len(entries)} requests, {time.perf_counter() - start:.0f} s",
                        key=f"direct {i}")
        t = time.perf_counter()
        pipe.infer({k: a for k, (_, a) in entry.arrays().items()})
        latencies.append(time.perf_counter() - t)
        for s in STAGES:
            stages[s] += pipe.last_timings.get(s, 0.0)
    progress.done()
    n = len(latencies)
    cumulative = np.cumsum(latencies)
    return {
        "requests": n, "load_s": load_s, "threads": pipe.threads,
        "latency_ms": _percentiles(latencies),
        "stage_ms": {s: v / n * 1000.0 for s, v in stages.items()},
        # N requests one after another: N / (time they took together), for every N measured.
        "throughput_by_n": {str(k + 1): float((k + 1) / cumulative[k]) for k in range(n)},
        "throughput": float(n / cumulative[-1]),
    }


# ----------------------------------------------------------------------------------------------- run


def _server_info(client) -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        meta = client.get_server_metadata(as_json=True)
        info["server"] = f"{meta.get('name', 'triton')} {meta.get('version', '')}".strip()
    except Exception:  # noqa: BLE001
        pass
    instances = {}
    for name in MODELS:
        try:
            config = client.get_model_config(name, as_json=True)["config"]
            instances[name] = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or None
        except Exception:  # noqa: BLE001
            instances[name] = None
    info["instances"] = instances
    return info


def _loadavg() -> float | None:
    """The host's 1-minute load average: other work on a shared machine skews CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _pick_load(cfg: BenchConfig):
    """(perf_analyzer or None, why not) for cfg.load."""
    from .perf_analyzer import PerfAnalyzerUnavailable, find_perf_analyzer

    if cfg.load == "python":
        return None, "--load python"
    try:
        return find_perf_analyzer(), ""
    except PerfAnalyzerUnavailable as e:
        if cfg.load == "perf_analyzer":
            raise BenchError(str(e)) from None
        return None, str(e)


def overhead(level: dict[str, Any]) -> dict[str, float]:
    """(a): the client's end-to-end latency against the leaf models' compute per request."""
    models = level["models"]
    e2e = level["latency_ms"]["avg"]
    leaf = sum(models[m]["compute_ms"] for m in LEAVES)
    inner = models["transformer"]["success_ms"] + models["vae_encoder"]["success_ms"]
    sampler_own = max(models["sampler"]["compute_ms"] - inner, 0.0)
    queue = sum(models[m]["queue_ms"] for m in MODELS if m != MODEL)
    return {
        "e2e_ms": e2e,
        "server_ms": models[MODEL]["success_ms"],  # the ensemble, from Triton's receipt to its response
        "leaf_compute_ms": leaf,
        "sampler_own_ms": sampler_own,  # the denoising loop's own math and its BLS round trips
        "queue_ms": queue,
        "other_ms": e2e - leaf - sampler_own - queue,  # gRPC, the ensemble's hand-offs, tensor copies
        "overhead_ms": e2e - leaf,
        "ratio": e2e / leaf if leaf > 0 else float("nan"),
    }


def compare(levels: list[dict[str, Any]], direct: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    one = next((lv for lv in levels if lv["concurrency"] == 1), None)
    if one is not None:
        out["server_overhead_c1_ms"] = one["overhead"]["overhead_ms"]
    if direct is None or "latency_ms" not in direct:
        return out
    if one is not None:
        t, d = one["latency_ms"]["avg"], direct["latency_ms"]["avg"]
        out["latency_c1"] = {"triton_ms": t, "direct_ms": d, "overhead_ms": t - d, "ratio": t / d,
                             "triton_p50_ms": one["latency_ms"]["p50"], "direct_p50_ms": direct["latency_ms"]["p50"]}
    rows = []
    for lv in levels:
        n = lv["concurrency"]
        d = direct["throughput_by_n"].get(str(n), direct["throughput"])
        rows.append({"concurrency": n, "triton": lv["throughput"], "direct": d, "ratio": lv["throughput"] / d})
    out["throughput"] = rows
    goals = {}
    if "latency_c1" in out:
        goals["overhead_under_5ms_vs_direct"] = out["latency_c1"]["overhead_ms"] < OVERHEAD_GOAL_MS
    if one is not None:
        goals["overhead_under_5ms_vs_leaf_compute"] = one["overhead"]["overhead_ms"] < OVERHEAD_GOAL_MS
    above = [r for r in rows if r["concurrency"] >= 2]
    if above:
        goals["faster_than_direct_at_c_ge_2"] = all(r["ratio"] > 1 for r in above)
    out["goals"] = goals
    return out


def bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; write report.md, report.json and report.png into cfg.out; return the report."""
    import tritonclient.grpc as grpcclient

    progress = Progress(cfg.progress)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    pa, why_not = _pick_load(cfg)
    client = grpcclient.InferenceServerClient(cfg.url)
    try:
        try:
            ready = client.is_model_ready(MODEL)
        except Exception as e:  # noqa: BLE001
            raise BenchError(f"cannot reach Triton at {cfg.url} (gRPC): {e}") from None
        if not ready:
            raise BenchError(f"{MODEL} is not ready on {cfg.url}")
        setup = {
            "url": cfg.url, "model": MODEL, "protocol": "grpc", "concurrency": cfg.concurrency,
            "sizes": [f"{w}x{h}" for w, h in cfg.sizes], "references": cfg.references,
            "reference_size": "{}x{}".format(*cfg.reference_size),
            "steps": cfg.steps if cfg.steps is not None else "server default",
            "requests": cfg.requests,
            "measurement": "count_windows (stabilised)" if cfg.windows else "fixed request count",
            "warmup": cfg.warmup, "load": f"perf_analyzer {pa.version}" if pa else "tritonclient threads",
            "perf_analyzer": {"binary": str(pa.binary), "version": pa.version} if pa else {"unavailable": why_not},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
                     "load_average_start": _loadavg()},
            **_server_info(client),
        }
        refs = [reference_image(i, *cfg.reference_size) for i in range(cfg.references)]
        run = uuid.uuid4().hex[:8]  # in every prompt: no response-cache hits from an earlier run

        # Warm-up: an instance's first requests pay for lazy initialisation and memory growth. Each round
        # sends every size to as many requests at once as the most-instanced model has instances.
        fanout = max([v for k, v in setup["instances"].items() if v and k != "sampler"] or [1])
        warm = make_entries(cfg.warmup * fanout * len(cfg.sizes), cfg.sizes, refs, f"{run}-warm-up", cfg.steps)
        if warm:
            progress.update(f"bench: warm-up, {len(warm)} requests, {fanout} at a time")
            python_level(BenchConfig(url=cfg.url, timeout_s=cfg.timeout_s), fanout, warm)

        levels = []
        for li, c in enumerate(cfg.concurrency):
            n = max(cfg.requests, 1) * c
            entries = make_entries(max(n, 16) if cfg.windows else n, cfg.sizes, refs, f"{run}-c{c}", cfg.steps)
            data_path = out / f"input-data-c{c}.json"
            data_path.write_text(json.dumps({"data": [e.perf_analyzer_data() for e in entries]}))
            before = settled_snapshot(client)
            stop = threading.Event()
            label = f"concurrency {c} ({li + 1}/{len(cfg.concurrency)})"
            watcher = threading.Thread(target=_watch, args=(cfg.url, before.get(MODEL, {}).get("success_count", 0),
                                                             None if cfg.windows else n, label, progress, stop),
                                       daemon=True)
            watcher.start()
            try:
                load = perf_analyzer_level(pa, cfg, c, n, data_path, out) if pa else python_level(cfg, c, entries)
            finally:
                stop.set()
                watcher.join()
                progress.done()
            ens = before.get(MODEL, {})
            d = delta(before, settled_snapshot(client, ens.get("success_count", 0) + ens.get("fail_count", 0) + n))
            level = {
                "concurrency": c, "load": load.source,
                "requests": d.get(MODEL, {}).get("success_count", 0), "wall_s": load.wall_s,
                "throughput": load.throughput, "throughput_reported": load.reported_throughput,
                "latency_ms": load.latency_ms, "client_ms": load.client_ms,
                "models": model_table(d), "failures": d.get(MODEL, {}).get("fail_count", 0),
            }
            level["overhead"] = overhead(level)
            levels.append(level)
            progress.update(f"bench: concurrency {c}: {level['requests']} requests, {load.throughput:.3f} images/s, "
                            f"p50 {load.latency_ms['p50']:.1f} ms, p99 {load.latency_ms['p99']:.1f} ms")
            progress.done()
    finally:
        client.close()

    direct: dict[str, Any] | None
    if not cfg.direct:
        direct = {"skipped": "--no-direct"}
    elif cfg.repository is None:
        direct = {"skipped": "no --repository (the folder the server loaded, on this machine)"}
    else:
        n = max(max(cfg.concurrency), cfg.requests)
        try:
            direct = run_direct(cfg, make_entries(n, cfg.sizes, refs, f"{run}-direct", cfg.steps),
                                make_entries(cfg.warmup * len(cfg.sizes), cfg.sizes, refs, f"{run}-direct-warm-up",
                                             cfg.steps), progress)
        except (FileNotFoundError, ValueError) as e:
            direct = {"skipped": f"{type(e).__name__}: {e}"}
    setup["host"]["load_average_end"] = _loadavg()
    report = {"setup": setup, "levels": levels, "direct": direct,
              "comparison": compare(levels, direct if direct and "latency_ms" in direct else None)}
    write_report(report, out)
    return report


# ----------------------------------------------------------------------------------------------- report


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    s, levels, direct, cmp = report["setup"], report["levels"], report["direct"], report["comparison"]
    lines = [
        f"# flux2-klein bench: `{s['model']}` at {s['url']} ({s['protocol']})", "",
        f"- {s['date']}; {s.get('server', 'Triton')}; client host {s['host']['cpus']} CPUs ({s['host']['machine']}), "
        f"load average {s['host'].get('load_average_start')} at the start, "
        f"{s['host'].get('load_average_end')} at the end",
        f"- load: {s['load']}" + (f" (perf_analyzer unavailable: {s['perf_analyzer']['unavailable']})"
                                 if "unavailable" in s["perf_analyzer"] else ""),
        f"- sizes {', '.join(s['sizes'])}; {s['references']} reference image(s) of {s['reference_size']} per "
        f"request; steps: {s['steps']}; "
        f"{s['measurement']}, {s['requests']} x concurrency requests per level; {s['warmup']} warm-up round(s)",
        "- images/s: " + ("perf_analyzer's, over its stabilised windows" if s["measurement"].startswith("count")
                          else "concurrency / mean latency (Little's law for the closed loop; perf_analyzer's own "
                               "figure for a fixed request count includes up to 1 s of polling, see report.json's "
                               "throughput_reported)"),
        "- instances: " + ", ".join(f"{k} {v}" for k, v in s.get("instances", {}).items() if v is not None), "",
        "## Latency and throughput", "",
        "| concurrency | requests | images/s | p50 ms | p90 ms | p99 ms | avg ms | leaf compute ms "
        "| overhead ms | avg / leaf | sampler own ms | queue ms | other ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        lat, o = lv["latency_ms"], lv["overhead"]
        lines.append(f"| {lv['concurrency']} | {lv['requests']} | {_f(lv['throughput'], 3)} | {_f(lat['p50'])} | "
                     f"{_f(lat['p90'])} | {_f(lat['p99'])} | {_f(lat['avg'])} | {_f(o['leaf_compute_ms'])} | "
                     f"{_f(o['overhead_ms'])} | {_f(o['ratio'], 3)} | {_f(o['sampler_own_ms'])} | "
                     f"{_f(o['queue_ms'])} | {_f(o['other_ms'])} |")
    lines += ["", "Latency is the client's, end to end (avg over the level's requests). The rest is per request "
              "from Triton's statistics: leaf compute sums the compute time (input + infer + output) of "
              f"{', '.join(LEAVES)}; overhead = avg latency - leaf compute, made of the sampler's own time "
              "(its loop's math, which the direct run does too, and its BLS round trips), queueing in every "
              "model, and other (gRPC, the ensemble's hand-offs, the image's transfer).", ""]
    for lv in levels:
        lines += [f"### Per model, concurrency {lv['concurrency']}", "",
                  "| model | calls / request | queue ms | compute ms | compute ms / call | cache hits |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, m in lv["models"].items():
            lines.append(f"| {name} | {_f(m['calls_per_request'], 2)} | {_f(m['queue_ms'], 2)} | "
                         f"{_f(m['compute_ms'], 2)} | {_f(m['compute_per_call_ms'], 2)} | {m['cache_hits']} |")
        lines.append(f"\nensemble on the server: {_f(lv['overhead']['server_ms'])} ms per request; "
                     f"client end to end: {_f(lv['latency_ms']['avg'])} ms\n")
    lines += ["## Serving overhead", ""]
    if "server_overhead_c1_ms" in cmp:
        one = next(lv for lv in levels if lv["concurrency"] == 1)["overhead"]
        lines.append(f"- (a) on the server, concurrency 1: end-to-end - leaf compute = "
                     f"{_f(cmp['server_overhead_c1_ms'], 2)} ms per request (ratio {_f(one['ratio'], 3)}): the "
                     f"sampler's own time {_f(one['sampler_own_ms'], 2)} ms, queues {_f(one['queue_ms'], 2)} ms, "
                     f"other {_f(one['other_ms'], 2)} ms")
    if "skipped" in (direct or {}):
        lines.append(f"- (b) direct comparison not run: {direct['skipped']}")
    else:
        c1 = cmp.get("latency_c1")
        lines.append(f"- (b) the same graphs in one process (`DirectPipeline`, ONNX Runtime threads per graph: "
                     f"{direct['threads']}), {direct['requests']} requests one after another")
        if c1:
            lines.append(f"  - concurrency 1: Triton {_f(c1['triton_ms'])} ms (p50 {_f(c1['triton_p50_ms'])}) vs "
                         f"direct {_f(c1['direct_ms'])} ms (p50 {_f(c1['direct_p50_ms'])}): overhead "
                         f"{_f(c1['overhead_ms'], 2)} ms, ratio Triton/direct {_f(c1['ratio'], 3)}")
        stages = ", ".join(f"{k} {_f(v, 2)}" for k, v in direct["stage_ms"].items())
        lines += [f"  - direct per stage (ms per request): {stages}", "",
                  "| concurrency N | Triton images/s | direct images/s (N in a row) | Triton / direct |",
                  "|---:|---:|---:|---:|"]
        for r in cmp.get("throughput", []):
            lines.append(f"| {r['concurrency']} | {_f(r['triton'], 3)} | {_f(r['direct'], 3)} | {_f(r['ratio'], 3)} |")
    goals = cmp.get("goals", {})
    if goals:
        lines += ["", f"Goals (reported, not enforced): overhead under {OVERHEAD_GOAL_MS:g} ms per request; more "
                  "images/s than the direct loop at concurrency >= 2.", ""]
        lines += [f"- {k}: {'met' if v else 'NOT met'}" for k, v in goals.items()]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    cs = [lv["concurrency"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax1.plot(cs, [lv["latency_ms"][p] for lv in levels], style, label=p)
    direct = report["direct"]
    if "latency_ms" in direct:
        ax1.axhline(direct["latency_ms"]["avg"], color="grey", lw=1, label="direct (avg)")
    ax1.set(xlabel="concurrency", ylabel="latency (ms)", title="latency")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    ax2.plot(cs, [lv["throughput"] for lv in levels], "o-", label="Triton")
    if "throughput_by_n" in direct:
        ax2.plot(cs, [direct["throughput_by_n"].get(str(c), direct["throughput"]) for c in cs], "s--",
                 color="grey", label="direct, N in a row")
    ax2.set(xlabel="concurrency", ylabel="images/s", title="throughput")
    ax2.set_ylim(bottom=0)
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(cs)
        ax.grid(alpha=0.3)
    s = report["setup"]
    fig.suptitle(f"{s['model']} at {s['url']}: {', '.join(s['sizes'])}, {s['references']} refs, {s['load']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "report.png")


# ----------------------------------------------------------------------------------------------- CLI


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `bench` subcommand on an argparse subparsers object; its func is run_bench."""
    b = subparsers.add_parser(
        "bench", help="benchmark a running server with perf_analyzer and report",
        description="Load flux2_klein over gRPC at a range of concurrencies (perf_analyzer), read every model's "
                    "queue and compute time from Triton's statistics, compare with the same graphs run "
                    "directly, and write report.md, report.json and report.png.")
    b.add_argument("--url", default="localhost:8001", metavar="HOST:PORT",
                   help="Triton's gRPC endpoint (default localhost:8001)")
    b.add_argument("--concurrency", type=parse_concurrency, default=parse_concurrency("1:8"),
                   metavar="START:END[:STEP]",
                   help="concurrency levels (default 1:8; also a list, e.g. 1,2,4,8)")
    b.add_argument("--sizes", type=parse_sizes, default=[(1024, 1024)], metavar="WxH,...",
                   help="output sizes, taken in turn (default 1024x1024)")
    b.add_argument("--references", type=parse_references, default=0, metavar="N",
                   help=f"reference images per request, 0..{MAX_REFERENCES} (default 0: text to image)")
    b.add_argument("--reference-size", type=_reference_size, default=(1024, 1024), metavar="WxH",
                   help="the synthetic reference images' size (default 1024x1024)")
    b.add_argument("--steps", type=int, default=None, metavar="N", help="denoising steps (default: the server's)")
    b.add_argument("--requests", type=int, default=4, metavar="N",
                   help="requests measured per level: N x concurrency (default 4)")
    b.add_argument("--windows", action="store_true",
                   help="measure with perf_analyzer's stabilising count windows of N x concurrency requests "
                        "instead of one fixed count")
    b.add_argument("--stability", type=int, default=20, metavar="PCT",
                   help="with --windows: allowed spread (default 20%%)")
    b.add_argument("--warmup", type=int, default=2, metavar="N",
                   help="warm-up rounds before measuring: per size, as many requests at once as a model has "
                        "instances, and N direct requests (default 2)")
    b.add_argument("--repository", default=None, metavar="REPO",
                   help="the repository the server loaded, on this machine: also run its graphs directly "
                        "(DirectPipeline) and compare")
    b.add_argument("--direct-threads", type=int, default=None, metavar="N",
                   help="ONNX Runtime threads per graph in the direct run (default: as the Triton models)")
    b.add_argument("--no-direct", action="store_true", help="skip the direct comparison")
    b.add_argument("--load", choices=("auto", "perf_analyzer", "python"), default="auto",
                   help="load generator: perf_analyzer, tritonclient threads, or auto (perf_analyzer if one runs)")
    b.add_argument("--timeout", type=float, default=None, metavar="S", help="give up on a level after S seconds")
    b.add_argument("--out", default="out/bench", metavar="DIR",
                   help="folder for the report (default out/bench, which git ignores)")
    b.add_argument("--quiet", action="store_true", help="no progress line")
    b.set_defaults(func=run_bench)
    return b


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        url=args.url, concurrency=args.concurrency, sizes=args.sizes, references=args.references,
        reference_size=args.reference_size, steps=args.steps,
        requests=args.requests, windows=args.windows, stability=args.stability, warmup=args.warmup,
        repository=Path(args.repository) if args.repository else None, direct=not args.no_direct,
        direct_threads=args.direct_threads, load=args.load, out=Path(args.out), timeout_s=args.timeout,
        progress=not args.quiet,
    )


def run_bench(args: argparse.Namespace) -> int:
    """0: report written (its path on stdout); 1: the benchmark could not run."""
    try:
        report = bench(config_from_args(args))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    print(f"{out / 'report.md'}\t{len(report['levels'])} levels, load: {report['setup']['load']}")
    return 0


__all__ = ["add_bench_parser", "run_bench", "bench", "BenchConfig", "BenchError", "parse_concurrency"]
