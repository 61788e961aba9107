"""The GPU benchmark's report: the phases' results side by side, the ratios against the goals, report.md/json.

Definitions (stated in the report too):
- latency: a client's seconds from sending a request to holding the image, one request at a time (median);
- images/s at c: diffusers runs a batch of c prompts per call; Triton serves c clients at once;
- serving overhead: Triton's end-to-end latency at c = 1 (mean) minus the compute time of the models that do
  the request's work (preprocess, text encoder, DiT, VAE encoder and decoder), per request, from Triton's own
  statistics: what the ensemble, the sampler's loop and its BLS calls, the transport and the queues add.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The goals, as ratios measured in one run (Triton over diffusers).
GOALS = {
    "latency_vs_eager": 0.55,      # at most
    "latency_vs_compiled": 0.80,   # at most
    "images_per_s_at_4": 1.5,      # at least, against diffusers with a batch of 4
    "overhead_ms": 10.0,           # at most, per request at c = 1
}


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


def build(results: dict, args, steps: int, guidance: float) -> Report:
    eager, compiled, triton = results.get("diffusers"), results.get("diffusers-compiled"), results.get("triton")
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
    sides = [("diffusers eager", eager), ("diffusers compiled", compiled), ("Triton (ours)", triton)]
    lines += ["| | " + " | ".join(name for name, r in sides if r) + " |",
              "|---|" + "---:|" * sum(1 for _, r in sides if r)]
    row = lambda label, f: lines.append(f"| {label} | " + " | ".join(f(r) for _, r in sides if r) + " |")  # noqa: E731
    row("what", lambda r: r["what"])
    row("latency 1 at a time, median s", lambda r: _fmt(r["latency_s"]["p50"]))
    row("latency p90 s", lambda r: _fmt(r["latency_s"]["p90"]))
    for c in args.concurrency:
        row(f"images/s at {c}", lambda r, c=c: _fmt(_level(r, c)))
    row("start: load (+ compile) s", lambda r: _fmt(r.get("load_s", r.get("ready_s")), ".1f")
        + (f" (+{r['compile_s']:.0f})" if r.get("compile_s") else ""))
    lines.append("")
    lines.append("images/s: diffusers runs a batch of c prompts per call; Triton serves c clients at once.")

    ratios, verdicts = {}, []
    if triton and eager:
        ratios["latency_vs_eager"] = triton["latency_s"]["p50"] / eager["latency_s"]["p50"]
        i4 = (_level(triton, 4), _level(eager, 4))
        if None not in i4:
            ratios["images_per_s_at_4"] = i4[0] / i4[1]
    if triton and compiled:
        ratios["latency_vs_compiled"] = triton["latency_s"]["p50"] / compiled["latency_s"]["p50"]
    if triton and "overhead_c1" in triton:
        ratios["overhead_ms"] = triton["overhead_c1"]["overhead_ms"]
    for key, value in ratios.items():
        goal = GOALS[key]
        met = value >= goal if key == "images_per_s_at_4" else value <= goal
        verdicts.append(f"| {key} | {value:.3f} | {'>=' if key == 'images_per_s_at_4' else '<='} {goal} | "
                        f"{'met' if met else 'NOT met'} |")
    data["ratios"] = ratios
    if verdicts:
        lines += ["", "## Goals (Triton over diffusers, this run)", "", "| | measured | goal | |", "|---|---:|---:|---|",
                  *verdicts]

    if triton and "models_c1" in triton:
        lines += ["", "## Triton, per request at c = 1 (Triton's statistics)", "",
                  "| model | calls | compute ms | queue ms |", "|---|---:|---:|---:|"]
        for name, mrow in triton["models_c1"].items():
            if mrow["calls"]:
                lines.append(f"| {name} | {mrow['calls_per_request']:.0f} | {mrow['compute_ms']:.1f} | {mrow['queue_ms']:.1f} |")
        o = triton["overhead_c1"]
        lines += ["", f"Serving overhead: {o['overhead_ms']:.1f} ms per request = end to end {o['e2e_ms']:.1f} ms minus "
                      f"the leaves' compute {o['leaf_compute_ms']:.1f} ms (of which the sampler's own loop and BLS "
                      f"{o['sampler_own_ms']:.1f} ms, queues {o['queue_ms']:.1f} ms)."]
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
                      f"{fp8['velocity_psnr_db']:.1f} dB ({fp8['dit_layers']} FP8 layers)",
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
    lines += ["", "Serving overhead is end-to-end latency minus the leaves' compute (Triton's statistics); "
                  "random weights: speed is the real model's, pictures are not."]
    return Report("\n".join(lines), data)


def save(report: Report, work: Path, report_dir: Path | None) -> None:
    from PIL import Image

    for folder in filter(None, [work, report_dir]):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.json").write_text(json.dumps(report.data, indent=1, default=str))
        (folder / "report.md").write_text(report.text + "\n")
    if report_dir is None:
        return
    for side in ("diffusers", "diffusers_compiled", "triton"):
        npy = work / f"{side}_image0.npy"
        if npy.exists():
            Image.fromarray(np.load(npy)).save(report_dir / f"{side}_image0.png")
    log = work / "tritonserver.log"
    if log.exists():  # its end: what went wrong, if anything did
        (report_dir / "tritonserver.log").write_bytes(log.read_bytes()[-(4 << 20):])
