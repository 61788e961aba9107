"""What a leaf model measures about itself: its network's own time per call, and dynamo's compiles.

The serving overhead is end to end minus the networks themselves. Triton's statistics time a Python model's
whole `execute` (its input and output copies, a CUDA IPC open per GPU input, whatever glue runs around the
network), so they hide part of what serving adds; only the leaf can time the network alone. Each leaf wraps
its network call in `LeafMonitor.call`, which times it (CUDA events on the leaf's stream on a GPU, the host
clock on a CPU) and counts the graphs dynamo compiled during the call. The counts leave the process as
Triton custom metrics (python_backend's `pb_utils.MetricFamily`, see `TritonMetrics`), scraped from Triton's
metrics port (`parse_metrics`); the bench subtracts their delta over a level from the end-to-end latency.

Metrics, labels model (the Triton model name) and instance (its instance name), all counters:
  flux2_klein_network_seconds_total   seconds inside the network (forward pass only)
  flux2_klein_network_calls_total     network calls
  flux2_klein_compiles_total          graphs dynamo compiled inside a call after warm-up: 0 when warm-up
                                      covered what the repository sends; anything else is a request that
                                      paid for a compile (the leaf logs it too)
Any leaf runtime can adopt it (ONNX Runtime: the same wrapper; no dynamo there, so its compiles stay 0).

Compiles are counted with `torch._dynamo.utils.counters["stats"]["unique_graphs"]`, which dynamo increments
once per graph it hands a backend (torch/_dynamo/output_graph.py, OutputGraph.compile_and_call_fx_graph,
read in torch 2.13.0's wheel; the same increment is there in every 2.x release). It counts a recompile on a
guard failure (a new dtype, a new specialised size) as much as a first compile, whatever the backend, so
`backend="eager"` shows on a CPU exactly what inductor would compile on a GPU. Counting around each call
(not process-wide) keeps the number per leaf when several leaves share a process (tests, the bench).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field

import torch

NETWORK_SECONDS = "flux2_klein_network_seconds_total"
NETWORK_CALLS = "flux2_klein_network_calls_total"
COMPILES = "flux2_klein_compiles_total"
METRICS = {
    NETWORK_SECONDS: "Seconds a leaf spent inside its network (forward pass only, timed by the leaf)",
    NETWORK_CALLS: "Network calls of a leaf",
    COMPILES: "Graphs torch.compile (dynamo) compiled during a request, after the leaf's warm-up",
}


def compile_count() -> int:
    """Graphs dynamo has compiled in this process so far (see the module docstring for the counter); 0 where
    dynamo was never imported (torch.compile imports it), so an eager leaf does not pay for its import."""
    utils = sys.modules.get("torch._dynamo.utils")
    return 0 if utils is None else int(utils.counters["stats"]["unique_graphs"])


@dataclass
class LeafMonitor:
    """Times a leaf's network calls and counts the graphs compiled inside them.

    `warmed()` marks the end of warm-up: compiles before it are the start's (`warm_compiles`), after it a
    request's (`compiles`). `sink(seconds, compiled)` (TritonMetrics.record) is told about every call after
    warm-up."""

    device: torch.device
    calls: int = 0
    seconds: float = 0.0
    compiles: int = 0
    warm_compiles: int = 0
    serving: bool = False
    sink: object = None
    last_compiled: int = field(default=0, repr=False)

    def call(self, fn, *args):
        """fn(*args), timed and watched; the network's result."""
        before = compile_count()
        if self.device.type == "cuda":
            # Events on the stream the network runs on: its kernels only, not the host's wait for them.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn(*args)
            end.record()
            end.synchronize()  # the outputs leave the process next, which waits for the stream anyway
            seconds = start.elapsed_time(end) / 1000
        else:
            t = time.perf_counter()
            result = fn(*args)
            seconds = time.perf_counter() - t
        compiled = compile_count() - before
        self.last_compiled = compiled
        if self.serving:
            self.calls += 1
            self.seconds += seconds
            self.compiles += compiled
            if self.sink is not None:
                self.sink(seconds, compiled)
        else:
            self.warm_compiles += compiled
        return result

    def warmed(self) -> None:
        self.serving = True


class TritonMetrics:
    """The monitor's numbers as Triton custom metrics (python_backend's custom-metrics API:
    triton-inference-server/python_backend README "Custom Metrics" and examples/custom_metrics/model.py,
    r24.xx: `pb_utils.MetricFamily(name, description, kind)`, `family.Metric(labels)`, `metric.increment`).
    `pb_utils` is passed in, so that this module imports outside a Triton stub."""

    def __init__(self, pb_utils, model: str, instance: str):
        counter = getattr(pb_utils.MetricFamily, "COUNTER", None) or pb_utils.COUNTER
        labels = {"model": model, "instance": instance}
        self.families = {name: pb_utils.MetricFamily(name=name, description=text, kind=counter)
                         for name, text in METRICS.items()}
        self.metrics = {name: family.Metric(labels=labels) for name, family in self.families.items()}

    def record(self, seconds: float, compiled: int) -> None:
        self.metrics[NETWORK_SECONDS].increment(seconds)
        self.metrics[NETWORK_CALLS].increment(1)
        if compiled:
            self.metrics[COMPILES].increment(compiled)

    def close(self) -> None:
        # python_backend refuses to delete a MetricFamily before its Metric objects.
        self.metrics.clear()
        self.families.clear()


_LINE = re.compile(r'^(flux2_klein_[a-z_]+)\{([^}]*)\}\s+(\S+)')
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text from Triton's metrics port -> {model: {"network_s", "calls", "compiles"}}, summed over
    instances."""
    keys = {NETWORK_SECONDS: "network_s", NETWORK_CALLS: "calls", COMPILES: "compiles"}
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m or m.group(1) not in keys:
            continue
        model = dict(_LABEL.findall(m.group(2))).get("model", "?")
        row = out.setdefault(model, {"network_s": 0.0, "calls": 0.0, "compiles": 0.0})
        row[keys[m.group(1)]] += float(m.group(3))
    return out


def metrics_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    return {model: {k: v - before.get(model, {}).get(k, 0.0) for k, v in row.items()} for model, row in after.items()}


def read_metrics(url: str, timeout_s: float = 30) -> dict[str, dict[str, float]]:
    """parse_metrics of http://URL/metrics (Triton's metrics port), with the standard library."""
    import urllib.request

    with urllib.request.urlopen(f"http://{url}/metrics", timeout=timeout_s) as r:
        return parse_metrics(r.read().decode(errors="replace"))
