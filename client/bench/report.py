"""The benchmark's report: report.json (every number), report.md (tables) and report.png (plots)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .gateway import markdown_lines as gateway_lines
from .stats import OVERHEAD_DEFINITION, OVERHEAD_GOAL_MS, goal_explanations, sample_size_warning


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
        "- instances: " + ", ".join(f"{k} {v}" for k, v in s.get("instances", {}).items() if v is not None),
        "- Triton's leaves: threads per instance " + (", ".join(f"{k} {v}" for k, v in s.get("leaf_threads", {}).items())
                                                      or "not reported")
        + "; the direct run builds its networks as the served leaves do (ONNX Runtime: "
          "`flux2_klein.ort_session.make_session`; torch: `torch_runtime.load_leaf`; its line below)",
        f"- {OVERHEAD_DEFINITION}. It is the only figure this report calls overhead.", "",
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
              "from Triton's statistics: overhead = avg latency - leaf compute, made of the sampler's own time "
              "(its loop's math, which the direct run does too, and its BLS round trips), queueing in every "
              "model, and other (gRPC, the ensemble's hand-offs, the image's transfer).", ""]
    warned = [(lv["concurrency"], sample_size_warning(lv["requests"])) for lv in levels]
    lines += [f"> **Sample size, concurrency {c}:** {w}." for c, w in warned if w]
    if any(w for _, w in warned):
        lines.append("")
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
        lines.append(f"- serving overhead at concurrency 1: end to end {_f(one['e2e_ms'], 2)} ms - leaf compute "
                     f"{_f(one['leaf_compute_ms'], 2)} ms = {_f(cmp['server_overhead_c1_ms'], 2)} ms per request "
                     f"(end to end / leaf compute {_f(one['ratio'], 3)}): the sampler's own time "
                     f"{_f(one['sampler_own_ms'], 2)} ms, queues {_f(one['queue_ms'], 2)} ms, "
                     f"other {_f(one['other_ms'], 2)} ms")
    if "skipped" in (direct or {}):
        lines.append(f"- in-process comparison not run: {direct['skipped']}")
    else:
        c1 = cmp.get("latency_c1")
        lines.append(f"- in-process comparison (\"direct\"): the same networks in one process (`DirectPipeline`, "
                     f"threads per network: {direct['threads']}; "
                     f"{direct.get('session_config', 'session options not recorded')}), "
                     f"{direct['requests']} requests one after "
                     "another; it runs the sampler's loop math too, so Triton - direct is what serving adds beyond "
                     "that math (not the overhead above, which includes it)")
        if c1:
            lines.append(f"  - concurrency 1: Triton {_f(c1['triton_ms'])} ms (p50 {_f(c1['triton_p50_ms'])}) vs "
                         f"direct {_f(c1['direct_ms'])} ms (p50 {_f(c1['direct_p50_ms'])}): Triton - direct "
                         f"{_f(c1['overhead_ms'], 2)} ms, ratio Triton/direct {_f(c1['ratio'], 3)}")
        warning = sample_size_warning(direct["requests"])
        if warning:
            lines.append(f"  - sample size, direct: {warning}")
        stages = ", ".join(f"{k} {_f(v, 2)}" for k, v in direct["stage_ms"].items())
        lines += [f"  - direct per stage (ms per request): {stages}", "",
                  "| concurrency N | Triton images/s | direct images/s (N in a row) | Triton / direct |",
                  "|---:|---:|---:|---:|"]
        for r in cmp.get("throughput", []):
            lines.append(f"| {r['concurrency']} | {_f(r['triton'], 3)} | {_f(r['direct'], 3)} | {_f(r['ratio'], 3)} |")
    if report.get("gateway"):
        lines += [""] + gateway_lines(report["gateway"])
    if report.get("memory"):
        lines += [""] + memory_lines(report["memory"])
    goals = cmp.get("goals", {})
    if goals:
        why = cmp.get("goal_explanations") or goal_explanations(levels, cmp)
        lines += ["", "## Goals", "", f"Reported, not enforced: overhead (and Triton - direct) under "
                  f"{OVERHEAD_GOAL_MS:g} ms per request; more images/s than the direct loop at concurrency >= 2. "
                  "They are the GPU's goals: on a CPU, expect them not to be met.", ""]
        for k, v in goals.items():
            lines.append(f"- **{k}: {'met' if v else 'NOT met'}**" + (f"  \n  {why[k]}." if k in why else ""))
    return "\n".join(lines) + "\n"


def memory_lines(memory: dict[str, Any]) -> list[str]:
    lines = ["## Memory per model instance", "",
             "Each Python-backend instance's process on this machine after the load (from /proc: peak = VmHWM, "
             "what it has needed since it started, now = VmRSS); the largest instance of each model.", "",
             "| model | instances | peak MB | now MB | torch loaded |", "|---|---:|---:|---:|---|"]
    for name, m in memory["models"].items():
        lines.append(f"| {name} | {m['instances']} | {_f(m['peak_mb'], 0)} | {_f(m['rss_mb'], 0)} | "
                     f"{'yes' if m['torch'] else 'no'} |")
    if memory.get("direct_process_peak_mb"):
        lines += ["", f"The direct run's process (every network in one process, plus the bench's client): peak "
                      f"{_f(memory['direct_process_peak_mb'], 0)} MB."]
    return lines


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

