"""One benchmark run (`bench`): set-up facts, warm-up, every concurrency level, the direct comparison, the report."""

from __future__ import annotations

import json
import os
import platform
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flux2_klein.contract import MODEL_NAME as MODEL

from .gateway import gateway_cost
from .load import perf_analyzer_level, python_level, run_direct
from .memory import by_model, instance_memory, own_peak_mb
from .progress import Progress, watch
from .report import write_report
from .stats import MODELS, compare, delta, model_table, overhead, settled_snapshot
from .workload import BenchConfig, BenchError, make_entries, reference_image


def _server_info(client) -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        meta = client.get_server_metadata(as_json=True)
        info["server"] = f"{meta.get('name', 'triton')} {meta.get('version', '')}".strip()
    except Exception:  # noqa: BLE001
        pass
    instances, leaf_threads = {}, {}
    for name in MODELS:
        try:
            config = client.get_model_config(name, as_json=True)["config"]
            instances[name] = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or None
            threads = config.get("parameters", {}).get("intra_op_threads", {}).get("string_value")
            if threads is not None:
                leaf_threads[name] = int(threads)
        except Exception:  # noqa: BLE001
            instances[name] = None
    info["instances"] = instances
    # The leaves' ONNX Runtime threads per instance, as their configs give them (the direct run's default).
    info["leaf_threads"] = leaf_threads
    return info


def _loadavg() -> float | None:
    """The host's 1-minute load average: other work on a shared machine skews CPU timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _pick_load(cfg: BenchConfig):
    """(perf_analyzer or None, why not) for cfg.load."""
    from ..perf_analyzer import PerfAnalyzerUnavailable, find_perf_analyzer

    if cfg.load == "python":
        return None, "--load python"
    try:
        return find_perf_analyzer(), ""
    except PerfAnalyzerUnavailable as e:
        if cfg.load == "perf_analyzer":
            raise BenchError(str(e)) from None
        return None, str(e)



def wait_for_server(cfg: BenchConfig) -> None:
    """Wait up to cfg.wait_s for Triton and the model to be ready, as `generate --wait` does (the client's
    `wait_until_ready`, with generate's message on stderr every few seconds); BenchError when it is not."""
    import sys

    from ..triton_client import Flux2KleinClient, GenerationError

    if cfg.wait_s <= 0:
        return
    try:
        with Flux2KleinClient(cfg.url, protocol="grpc", model=MODEL) as client:
            client.wait_until_ready(cfg.wait_s, on_wait=lambda waited, why: print(
                f"waiting for Triton ({waited:.0f} s of {cfg.wait_s:g} s): {why}", file=sys.stderr, flush=True))
    except GenerationError as e:
        raise BenchError(f"cannot reach Triton at {cfg.url} (gRPC): {e.message}") from None


def _setup(cfg: BenchConfig, client, pa, why_not: str) -> dict[str, Any]:
    """What the report says about the run's conditions; BenchError when the model is not there to measure."""
    try:
        ready = client.is_model_ready(MODEL)
    except Exception as e:  # noqa: BLE001
        raise BenchError(f"cannot reach Triton at {cfg.url} (gRPC): {e}") from None
    if not ready:
        raise BenchError(f"{MODEL} is not ready on {cfg.url}")
    return {
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


class Run:
    """One benchmark run against one server: its phases share the config, the client and the references."""

    def __init__(self, cfg: BenchConfig, client, pa, progress: Progress):
        self.cfg, self.client, self.pa, self.progress = cfg, client, pa, progress
        self.out = Path(cfg.out)
        self.refs = [reference_image(i, *cfg.reference_size) for i in range(cfg.references)]
        self.tag = uuid.uuid4().hex[:8]  # in every prompt: no response-cache hits from an earlier run

    def entries(self, count: int, what: str):
        return make_entries(count, self.cfg.sizes, self.refs, f"{self.tag}-{what}", self.cfg.steps)

    def warm_up(self, instances: dict[str, int | None]) -> None:
        """An instance's first requests pay for lazy initialisation and memory growth. Each round sends every
        size to as many requests at once as the most-instanced model has instances."""
        fanout = max([v for k, v in instances.items() if v and k != "sampler"] or [1])
        warm = self.entries(self.cfg.warmup * fanout * len(self.cfg.sizes), "warm-up")
        if warm:
            self.progress.update(f"bench: warm-up, {len(warm)} requests, {fanout} at a time")
            python_level(BenchConfig(url=self.cfg.url, timeout_s=self.cfg.timeout_s), fanout, warm)

    def level(self, c: int, label: str) -> dict[str, Any]:
        """One concurrency level: the load, and Triton's statistics before and after it."""
        cfg = self.cfg
        n = max(cfg.requests, 1) * c
        entries = self.entries(max(n, 16) if cfg.windows else n, f"c{c}")
        data_path = self.out / f"input-data-c{c}.json"
        data_path.write_text(json.dumps({"data": [e.perf_analyzer_data() for e in entries]}))
        before = settled_snapshot(self.client)
        ens = before.get(MODEL, {})
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(cfg.url, ens.get("success_count", 0),
                                                       None if cfg.windows else n, label, self.progress, stop),
                                   daemon=True)
        watcher.start()
        try:
            load = (perf_analyzer_level(self.pa, cfg, c, n, data_path, self.out) if self.pa
                    else python_level(cfg, c, entries))
        finally:
            stop.set()
            watcher.join()
            self.progress.done()
        d = delta(before, settled_snapshot(self.client, ens.get("success_count", 0) + ens.get("fail_count", 0) + n))
        level = {
            "concurrency": c, "load": load.source,
            "requests": d.get(MODEL, {}).get("success_count", 0), "wall_s": load.wall_s,
            "throughput": load.throughput, "throughput_reported": load.reported_throughput,
            "latency_ms": load.latency_ms, "client_ms": load.client_ms,
            "models": model_table(d), "failures": d.get(MODEL, {}).get("fail_count", 0),
        }
        level["overhead"] = overhead(level)
        self.progress.update(f"bench: concurrency {c}: {level['requests']} requests, {load.throughput:.3f} images/s, "
                             f"p50 {load.latency_ms['p50']:.1f} ms, p99 {load.latency_ms['p99']:.1f} ms")
        self.progress.done()
        return level

    def direct(self) -> dict[str, Any]:
        """The same requests through DirectPipeline, or why not."""
        cfg = self.cfg
        if not cfg.direct:
            return {"skipped": "--no-direct"}
        if cfg.repository is None:
            return {"skipped": "no --repository (the folder the server loaded, on this machine)"}
        n = max(max(cfg.concurrency), cfg.requests)
        try:
            return run_direct(cfg, self.entries(n, "direct"),
                              self.entries(cfg.warmup * len(cfg.sizes), "direct-warm-up"), self.progress)
        except (FileNotFoundError, ValueError) as e:
            return {"skipped": f"{type(e).__name__}: {e}"}


def _memory(cfg: BenchConfig) -> dict[str, Any] | None:
    """Each model instance's memory when the server runs here on cfg.repository (client/bench/memory.py)."""
    if cfg.repository is None:
        return None
    instances = instance_memory(cfg.repository)
    return {"instances": instances, "models": by_model(instances)} if instances else None


def bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; write report.md, report.json and report.png into cfg.out; return the report."""
    import tritonclient.grpc as grpcclient

    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    pa, why_not = _pick_load(cfg)
    wait_for_server(cfg)
    client = grpcclient.InferenceServerClient(cfg.url)
    try:
        setup = _setup(cfg, client, pa, why_not)
        run = Run(cfg, client, pa, Progress(cfg.progress))
        run.warm_up(setup["instances"])
        levels = [run.level(c, f"concurrency {c} ({i + 1}/{len(cfg.concurrency)})")
                  for i, c in enumerate(cfg.concurrency)]
        gateway = gateway_cost(cfg, client, run.entries(max(cfg.requests, 1) + 1, "gateway"),
                               run.progress) if cfg.gateway else None
    finally:
        client.close()
    # Read before the direct run, which may make this process (and the host) busy; after the levels, so the
    # peaks are those of this run's sizes (and of whatever the server served before).
    memory = _memory(cfg)
    direct = run.direct()
    if memory is not None and "latency_ms" in direct:
        memory["direct_process_peak_mb"] = own_peak_mb()
    setup["host"]["load_average_end"] = _loadavg()
    report = {"setup": setup, "levels": levels, "direct": direct,
              "comparison": compare(levels, direct if "latency_ms" in direct else None)}
    if memory is not None:
        report["memory"] = memory
    if gateway is not None:
        report["gateway"] = gateway
    write_report(report, Path(cfg.out))
    return report
