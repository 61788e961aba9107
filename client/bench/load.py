"""The load of one concurrency level: perf_analyzer, or tritonclient threads where it does not run; and the
same requests through `DirectPipeline`, without Triton."""

from __future__ import annotations

import csv
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flux2_klein.contract import MODEL_NAME as MODEL
from flux2_klein.contract import OUTPUT

from ..triton_client import build_inputs
from .progress import Progress
from .workload import BenchConfig, BenchError, Entry

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
                inputs = build_inputs(**entry.kwargs(), protocol="grpc")
                t = time.perf_counter()
                try:
                    client.infer(MODEL, inputs, outputs=[grpcclient.InferRequestedOutput(OUTPUT.name)],
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



def _direct_requests(pipe, entries: list[Entry], warm: list[Entry], progress: Progress):
    """`warm`, then `entries` through `pipe` one after another: (latencies in s, seconds per stage summed)."""
    from flux2_klein.direct import STAGES

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
    progress.update(f"bench: direct: {len(entries)}/{len(entries)} requests, {time.perf_counter() - start:.0f} s",
                    key=f"direct {len(entries)}")
    progress.done()
    return latencies, stages


def run_direct(cfg: BenchConfig, entries: list[Entry], warm: list[Entry], progress: Progress) -> dict[str, Any]:
    """The same requests through DirectPipeline, one after another, in this process, after `warm`: an
    onnxruntime repository's graphs, or a torch repository's leaves (torch_direct.py). Torch runs on the
    threads the served side gives it (the sampler's math on one, ort_session.one_torch_thread; a torch
    leaf's `intra_op_threads`) for the run only: this process's setting is restored after it."""
    import torch

    from flux2_klein.direct import DirectPipeline
    from flux2_klein.ort_session import one_torch_thread

    from .torch_direct import is_torch_repository, torch_sessions

    progress.update("bench: direct: loading the repository's graphs")
    threads_before = torch.get_num_threads()
    try:
        t = time.perf_counter()
        if is_torch_repository(cfg.repository):
            sessions, threads, config = torch_sessions(cfg.repository)
            pipe = DirectPipeline(cfg.repository, sessions=sessions)
            torch.set_num_threads(cfg.direct_threads or threads)
            config = config if not cfg.direct_threads else f"{config}; --direct-threads {cfg.direct_threads}"
        else:
            pipe = DirectPipeline(cfg.repository, intra_op_threads=cfg.direct_threads)
            one_torch_thread()  # as the Triton sampler on a CPU runs the loop's math
            config = pipe.session_config + "; sampler math: 1 torch thread"
        load_s = time.perf_counter() - t
        latencies, stages = _direct_requests(pipe, entries, warm, progress)
    finally:
        torch.set_num_threads(threads_before)
    n = len(latencies)
    cumulative = np.cumsum(latencies)
    return {
        "requests": n, "load_s": load_s, "threads": pipe.threads, "session_config": config,
        "latency_ms": _percentiles(latencies),
        "stage_ms": {s: v / n * 1000.0 for s, v in stages.items()},
        # N requests one after another: N / (time they took together), for every N measured.
        "throughput_by_n": {str(k + 1): float((k + 1) / cumulative[k]) for k in range(n)},
        "throughput": float(n / cumulative[-1]),
    }

