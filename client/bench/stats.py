"""Triton's statistics of every model, before and after a level, and what they say about serving overhead."""

from __future__ import annotations

import time
from typing import Any

from flux2_klein.contract import MODEL_NAME as MODEL

# The ensemble, its steps and what the sampler calls by BLS (stages.py; the optional postprocess last: a
# repository without it reports zeros). Its time is serving overhead, not a leaf's work.
MODELS = (MODEL, "preprocess", "text_encoder", "sampler", "transformer", "vae_decoder", "vae_encoder", "postprocess")
# The models whose compute is the request's work; the sampler's own time (loop math and the BLS round
# trips around its transformer/vae_encoder calls) is reported apart.
LEAVES = ("preprocess", "text_encoder", "transformer", "vae_encoder", "vae_decoder")
# The serving-overhead goal per request at concurrency 1 (issue 20), for every bench: its one home
# (bench/gpu_report.py reads it too).
OVERHEAD_GOAL_MS = 10.0
# The one definition of serving overhead, in every report (the GPU bench's too).
OVERHEAD_DEFINITION = (
    "serving overhead = the client's mean end-to-end latency minus the compute time (input + infer + output) "
    f"of the leaf models ({', '.join(LEAVES)}) per request, from Triton's statistics: what the ensemble, "
    "the sampler's own loop and its BLS calls, the queues and the transport add around the networks' work")
# Fewer requests than this in a level and p90/p99 are barely more than its largest value.
MIN_REQUESTS_FOR_TAILS = 20


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



def sample_size_warning(requests: int) -> str:
    """A warning for percentiles over too few requests, or "" when there are enough."""
    if requests >= MIN_REQUESTS_FOR_TAILS:
        return ""
    return (f"only {requests} request(s): p50/p90/p99 are interpolated between so few values that they say little "
            f"(with 2, p50 is their midpoint and can sit above or below the mean; p90 and p99 both sit near the "
            f"largest); use --requests so that each level has at least {MIN_REQUESTS_FOR_TAILS}")


def overhead(level: dict[str, Any]) -> dict[str, float]:
    """Serving overhead per request (OVERHEAD_DEFINITION) and where it goes."""
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


def goal_explanations(levels: list[dict[str, Any]], cmp: dict[str, Any]) -> dict[str, str]:
    """For each goal in cmp["goals"], what was measured against what was asked, and what it is made of."""
    out: dict[str, str] = {}
    goals = cmp.get("goals", {})
    one = next((lv for lv in levels if lv["concurrency"] == 1), None)
    if "overhead_under_goal_vs_leaf_compute" in goals and one is not None:
        o = one["overhead"]
        parts = {"the sampler's own loop and BLS calls": o["sampler_own_ms"], "queues": o["queue_ms"],
                 "transport and the ensemble's hand-offs": o["other_ms"]}
        biggest = max(parts, key=parts.get)
        out["overhead_under_goal_vs_leaf_compute"] = (
            f"measured {o['overhead_ms']:,.2f} ms at concurrency 1 against {OVERHEAD_GOAL_MS:g} ms; the largest part "
            f"is {biggest} ({parts[biggest]:,.2f} ms)" + (
                ". The sampler's loop math runs in any server, in-process too: on a CPU this figure mostly "
                "measures that math, not Triton" if biggest.startswith("the sampler") else ""))
    if "overhead_under_goal_vs_direct" in goals and "latency_c1" in cmp:
        c1 = cmp["latency_c1"]
        out["overhead_under_goal_vs_direct"] = (
            f"Triton {c1['triton_ms']:,.1f} ms - in-process {c1['direct_ms']:,.1f} ms = {c1['overhead_ms']:,.2f} ms "
            f"at concurrency 1 against {OVERHEAD_GOAL_MS:g} ms: what serving adds over running the same graphs in "
            "one process (gRPC, the ensemble, BLS, Python models); timings on a shared CPU host vary by more than "
            "5 ms between runs")
    if "faster_than_direct_at_c_ge_2" in goals:
        rows = [r for r in cmp.get("throughput", []) if r["concurrency"] >= 2]
        ratios = ", ".join(f"{r['concurrency']}: {r['ratio']:.3f}" for r in rows)
        out["faster_than_direct_at_c_ge_2"] = (
            f"Triton / in-process images/s by concurrency: {ratios}; the goal is above 1 at each" + (
                "" if goals["faster_than_direct_at_c_ge_2"] else
                ". Concurrent requests only go faster where instances or batching find idle compute: on a CPU "
                "whose cores every graph already uses, they mostly wait in the queues (see queue ms)"))
    return out


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
        goals["overhead_under_goal_vs_direct"] = out["latency_c1"]["overhead_ms"] < OVERHEAD_GOAL_MS
    if one is not None:
        goals["overhead_under_goal_vs_leaf_compute"] = one["overhead"]["overhead_ms"] < OVERHEAD_GOAL_MS
    above = [r for r in rows if r["concurrency"] >= 2]
    if above:
        goals["faster_than_direct_at_c_ge_2"] = all(r["ratio"] > 1 for r in above)
    out["goals"] = goals
    out["goal_explanations"] = goal_explanations(levels, out)
    return out

