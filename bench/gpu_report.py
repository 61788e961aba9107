"""The GPU benchmark's report: the phases' results side by side, the ratios against the goals, report.md/json.

Definitions (stated in the report too):
- latency: a client's seconds from sending a request to holding the image, one request at a time (median);
- images/s at c: diffusers runs a batch of c prompts per call; Triton serves c clients at once;
- serving overhead: Triton's end-to-end latency at c = 1 (mean) minus the networks' own time per request, as
  each leaf times its forward pass (CUDA events; flux2_klein/leaf_timing.py, read from Triton's metrics port):
  everything serving adds, inside a leaf's execute (its tensor copies, CUDA IPC, the guardrail in preprocess)
  as well as around it. Triton's statistics' view (end to end minus the leaf models' compute time) is shown
  beside it: the difference is what Triton adds inside the leaves;
- compiles after warm-up: graphs dynamo compiled while serving any request of the run; the goal is none.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flux2_klein.client.bench.stats import OVERHEAD_GOAL_MS

# The issue's goals, as ratios measured in one run (Triton over diffusers).
GOALS = {
    "latency_vs_eager": 0.55,      # at most
    "latency_vs_compiled": 0.80,   # at most
    "images_per_s_at_4": 1.5,      # at least, against diffusers with a batch of 4
    "overhead_ms": OVERHEAD_GOAL_MS,  # at most, per request at c = 1
    "compiles_after_warm_up": 0,   # at most
}
AT_LEAST = ("images_per_s_at_4",)


def version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version as v

    try:
        return v(package)
    except PackageNotFoundError:
        return "?"


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


def _commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


@dataclass
class Report:
    text: str
    data: dict = field(default_factory=dict)


def _level(result: dict | None, c: int) -> float | None:
    for lv in (result or {}).get("levels", []):
        if lv["concurrency"] == c:
            return lv["images_per_s"]
    return None


def _fmt(x, spec=".3f", none="-") -> str:
    return none if x is None else format(x, spec)


def _image_difference(work: Path, a: str, b: str) -> dict | None:
    pa, pb = work / f"{a}_image0.npy", work / f"{b}_image0.npy"
    if not (pa.exists() and pb.exists()):
        return None
    x, y = np.load(pa).astype(int), np.load(pb).astype(int)
    if x.shape != y.shape:
        return {"shapes": [list(x.shape), list(y.shape)]}
    d = np.abs(x - y)
    return {"max": int(d.max()), "mean": float(d.mean()), "share_differing": float((d > 0).mean())}


def phases(work: Path) -> list[tuple[str, str, str]]:
    """(phase, status, seconds) as the driver and bench/gpu_hopper.sh logged them (phases.tsv)."""
    path = work / "phases.tsv"
    if not path.exists():
        return []
    return [tuple((line.split("\t") + ["", ""])[:3]) for line in path.read_text().splitlines() if line.strip()]


def build(results: dict, args, steps: int, guidance: float) -> Report:
    eager, compiled, triton = results.get("diffusers"), results.get("diffusers-compiled"), results.get("triton")
    smoke = results.get("smoke")
    m = machine(args.device)
    data = {"size": f"{args.size[0]}x{args.size[1]}", "steps": steps, "guidance": guidance,
            "checkpoint": str(args.checkpoint), "machine": m, "python": platform.python_version(),
            "torch_version": version("torch"), "diffusers_version": version("diffusers"), "commit": _commit(),
            **results}
    lines = [f"# FLUX.2 [klein] on {m['device']}: diffusers against Triton",
             "",
             f"{data['size']}, {steps} steps, guidance {guidance:g}; checkpoint `{args.checkpoint}`; commit {data['commit']}; "
             f"torch {data['torch_version']}, diffusers {data['diffusers_version']}, Python {data['python']}"
             + (f"; driver {m['driver']}, {m['memory']}" if "driver" in m else ""),
             ""]
    ran = phases(Path(args.work))
    data["phases"] = [{"phase": a, "status": b, "seconds": c} for a, b, c in ran]
    if ran:
        lines += ["| phase | status | s |", "|---|---|---:|", *(f"| {a} | {b} | {c} |" for a, b, c in ran), ""]
    partial = [name for name, r in results.items() if r.get("partial")]
    if partial:
        lines += [f"Cut short (their results so far): {', '.join(partial)}.", ""]
    if smoke:
        compiles = smoke.get("compiles_after_warm_up", {})
        lines += [f"Smoke test on the tiny checkpoint ({smoke.get('what', '?')}): "
                  f"ready in {_fmt(smoke.get('ready_s'), '.0f')} s, median latency "
                  f"{_fmt(smoke.get('latency_s', {}).get('p50'))} s, compiles after warm-up "
                  f"{sum(compiles.values()) if compiles else '-'}.", ""]
    sides = [(name, r) for name, r in (("diffusers eager", eager), ("diffusers compiled", compiled),
                                         ("Triton (ours)", triton)) if r]
    if sides:  # none before the 4B phases ran (only the smoke test, or not even that)
        lines += ["| | " + " | ".join(name for name, _ in sides) + " |", "|---|" + "---:|" * len(sides)]
        row = lambda label, f: lines.append(f"| {label} | " + " | ".join(f(r) for _, r in sides) + " |")  # noqa: E731
        row("what", lambda r: r["what"] + (" (cut short)" if r.get("partial") else ""))
        row("latency 1 at a time, median s", lambda r: _fmt(r.get("latency_s", {}).get("p50")))
        row("latency p90 s", lambda r: _fmt(r.get("latency_s", {}).get("p90")))
        for c in args.concurrency:
            row(f"images/s at {c}", lambda r, c=c: _fmt(_level(r, c)))
        row("start: load (+ compile) s", lambda r: _fmt(r.get("load_s", r.get("ready_s")), ".1f")
            + (f" (+{r['compile_s']:.0f})" if r.get("compile_s") else ""))
        lines.append("")
        lines.append("images/s: diffusers runs a batch of c prompts per call; Triton serves c clients at once.")

    ratios, verdicts = {}, []
    triton = triton if triton and "latency_s" in triton else None  # cut short before its first latencies
    eager = eager if eager and "latency_s" in eager else None
    compiled = compiled if compiled and "latency_s" in compiled else None
    if triton and eager:
        ratios["latency_vs_eager"] = triton["latency_s"]["p50"] / eager["latency_s"]["p50"]
        i4 = (_level(triton, 4), _level(eager, 4))
        if None not in i4:
            ratios["images_per_s_at_4"] = i4[0] / i4[1]
    if triton and compiled:
        ratios["latency_vs_compiled"] = triton["latency_s"]["p50"] / compiled["latency_s"]["p50"]
    if triton and "overhead_inside_c1" in triton:
        ratios["overhead_ms"] = triton["overhead_inside_c1"]["overhead_ms"]
    elif triton and "overhead_c1" in triton:  # no leaf metrics (an older server): Triton's statistics' view
        ratios["overhead_ms"] = triton["overhead_c1"]["overhead_ms"]
    if triton and "compiles_after_warm_up" in triton:
        ratios["compiles_after_warm_up"] = sum(triton["compiles_after_warm_up"].values())
    for key, value in ratios.items():
        goal = GOALS[key]
        met = value >= goal if key in AT_LEAST else value <= goal
        verdicts.append(f"| {key} | {value:.3f} | {'>=' if key in AT_LEAST else '<='} {goal:g} | "
                        f"{'met' if met else 'NOT met'} |")
    data["ratios"] = ratios
    if verdicts:
        lines += ["", "## Goals (Triton over diffusers, this run)", "", "| | measured | goal | |", "|---|---:|---:|---|",
                  *verdicts]

    if triton and "models_c1" in triton:
        networks = triton.get("networks_c1", {})
        lines += ["", "## Triton, per request at c = 1 (Triton's statistics; network: the leaf's own timing)", "",
                  "| model | calls | compute ms | network ms | queue ms |", "|---|---:|---:|---:|---:|"]
        for name, mrow in triton["models_c1"].items():
            if mrow["calls"]:
                net = networks.get(name, {}).get("network_ms")
                lines.append(f"| {name} | {mrow['calls_per_request']:.0f} | {mrow['compute_ms']:.1f} | "
                             f"{_fmt(net, '.1f')} | {mrow['queue_ms']:.1f} |")
        o = triton["overhead_c1"]
        inside = triton.get("overhead_inside_c1")
        if inside:
            lines += ["", f"Serving overhead: {inside['overhead_ms']:.1f} ms per request = end to end "
                          f"{inside['e2e_ms']:.1f} ms minus the networks' own time {inside['network_ms']:.1f} ms "
                          f"(goal <= {OVERHEAD_GOAL_MS:g} ms). Of it, Triton's statistics see "
                          f"{o['overhead_ms']:.1f} ms outside the leaf models' compute (the sampler's own loop and BLS "
                          f"{o['sampler_own_ms']:.1f} ms, queues {o['queue_ms']:.1f} ms); the rest, "
                          f"{inside['overhead_ms'] - o['overhead_ms']:.1f} ms, is inside the leaves' execute "
                          "around their networks (tensor copies, CUDA IPC, preprocess and its guardrail)."]
        else:
            lines += ["", f"Serving overhead: {o['overhead_ms']:.1f} ms per request = end to end {o['e2e_ms']:.1f} ms "
                          f"minus the leaves' compute {o['leaf_compute_ms']:.1f} ms (of which the sampler's own loop "
                          f"and BLS {o['sampler_own_ms']:.1f} ms, queues {o['queue_ms']:.1f} ms); no leaf metrics."]
        compiles = triton.get("compiles_after_warm_up")
        if compiles is not None:
            lines.append("Compiles after warm-up, per leaf: " + ", ".join(f"{k} {v}" for k, v in compiles.items()) + ".")
        batches = [f"{lv['concurrency']}: {lv['sampler_batch_mean']:.2f}" for lv in triton.get("levels", [])]
        lines.append(f"Requests per sampler loop (dynamic batching), by concurrency: {', '.join(batches)}.")
        cost = triton.get("guardrail_cost")
        if cost:
            parts = [f"blocklist {cost['blocklist_us']:.0f} us" if cost.get("blocklist_us") is not None else None,
                     f"prompt check {cost['prompt_check_ms']:.2f} ms" if cost.get("prompt_check_ms") is not None else None,
                     f"image check {cost['image_check_ms']:.1f} ms" if cost.get("image_check_ms") is not None else None]
            lines.append("Guardrail per request (median, in process): " + (", ".join(p for p in parts if p) or "off") + ".")
        if triton.get("leaf_loads"):
            lines += ["", "Leaves at start:", *(f"- {line}" for line in triton["leaf_loads"])]

    fp8 = (eager or {}).get("fp8")
    if fp8:
        lines += ["", "## FP8 against BF16 (diffusers pipeline, same inputs)", ""]
        if "skipped" in fp8:
            lines.append(f"skipped: {fp8['skipped']}")
        else:
            lines += [f"{fp8['how']}.",
                      f"- DiT velocity: relative error {fp8['velocity_relative_error']:.4f}, PSNR "
                      f"{fp8['velocity_psnr_db']:.1f} dB ({fp8['dit_layers']} layers quantized by torchao, of "
                      f"{fp8.get('dit_layers_chosen', '?')} chosen)",
                      f"- image, DiT in FP8: PSNR {fp8['image_psnr_db_dit_fp8']:.1f} dB",
                      f"- image, DiT and text encoder ({fp8['text_encoder_layers']} layers) in FP8: PSNR "
                      f"{fp8['image_psnr_db_dit_and_text_encoder_fp8']:.1f} dB"]
    differences = {f"{a} vs {b}": d for a, b in (("diffusers", "triton"), ("diffusers", "diffusers_compiled"))
                   if (d := _image_difference(Path(args.work), a, b)) is not None}
    if differences:
        data["first_image_difference"] = differences
        lines += ["", "## First image, largest and mean difference per channel value", ""]
        lines += [f"- {k}: " + (f"max {d['max']}, mean {d['mean']:.3f}, {100 * d['share_differing']:.1f}% differ"
                                if "max" in d else f"shapes differ {d['shapes']}") for k, d in differences.items()]
    lines += ["", "Serving overhead is end-to-end latency minus the networks' own time (each leaf times its "
                  "forward pass); random weights: speed is the real model's, pictures are not."]
    return Report("\n".join(lines), data)


def save(report: Report, work: Path, report_dir: Path | None) -> None:
    from PIL import Image

    for folder in filter(None, [work, report_dir]):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report.data, indent=1, default=str))
        (folder / "report.md").write_text(report.text + "\n")
    if report_dir is None:
        return
    # At most 8 files come back from the GPU machine: report.md/json, two images, one server log (the 4B run's,
    # else the smoke test's), gpu-tests.txt and the script's phases.log.
    for side in ("diffusers", "triton"):
        npy = work / f"{side}_image0.npy"
        if npy.exists():
            Image.fromarray(np.load(npy)).save(report_dir / f"{side}_image0.png")
    for name in ("triton-tritonserver.log", "smoke-tritonserver.log"):
        log = work / name
        if log.exists():  # its end: what went wrong, if anything did
            (report_dir / "tritonserver.log").write_bytes(log.read_bytes()[-(4 << 20):])
            break
