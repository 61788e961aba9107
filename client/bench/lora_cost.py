"""What per-request LoRAs cost the torch DiT leaf: DiT steps per second with LoRAs unfused against fused.

    python -m flux2_klein.client.bench.lora_cost --out bench/results/DATE-cpu-lora-cost.json \
        --markdown bench/results/DATE-cpu-lora-cost.md

A repository built with `--lora-library` serves LoRAs unfused (flux2_klein/lora_library.py): every DiT call
runs each adapted layer's base GEMM plus, per active LoRA, two thin ones (x @ A^T @ B^T). A LoRA fused at build
time (`--lora`, flux2_klein/lora.py) costs nothing per step. This measures the price of the first against the
second, on the leaf the server runs: `torch_runtime.load_leaf` (the wrapper of networks.py, as
model_repository/torch_leaf.py loads it, with the library if there is one), called in torch.inference_mode with
the inputs of one batch-1 request (`specs.example_inputs`, as the leaf's warm-up makes them). One call is one
step of a distilled model. Five cases:

    plain       the checkpoint as it is
    fused       one LoRA fused into a copy (`lora.fuse_loras`)
    unfused_1   the library leaf, one LoRA active
    unfused_3   the library leaf, three LoRAs active
    unfused_0   the library leaf, every adapter disabled (a request without LoRAs: must be ~ plain)

They run interleaved, one call each per round (A B C D E, A B C D E, ...), so that a shared machine's drift
falls on every case alike; `activate()` between the library's cases is timed apart (what a switch of sets
costs a batch) and is not in the step times.

Two scales. `tiny`: the tiny checkpoint (flux2_klein/tiny.py) at the request's size, what CI can run; its
layers are 32-96 wide, so a rank-r LoRA is a large share of each GEMM there and its ratio says little about
klein. `piece`: klein 4B's real layer sizes (flux2_klein/configs/flux2-klein-4b.json: hidden 3072, MLP 9216,
text 7680) with 1 double-stream and 1 single-stream block instead of 5 and 20, random weights, in a checkpoint
folder whose other parts are the tiny one's (the DiT leaf reads only their configs): the GEMM shapes, and so
the LoRA's share of the work per layer, are klein's. Its token count can be lowered (`--piece-size`) to fit a
CPU: the base and the LoRA GEMMs both scale with tokens, so the ratio moves little with it (attention's share
grows with tokens, and LoRAs do not touch attention).

LoRAs are written here, straight into diffusers' PEFT layout (`transformer.<layer>.lora_A/B.weight`, as
`save_lora_weights` writes it) from the checkpoint's weight headers: random A and B at `--rank` on the
attention and MLP projections of every block (TARGETS), which is where published klein LoRAs put theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# The projections a LoRA adapts, as module-name suffixes inside transformer_blocks / single_transformer_blocks:
# the double-stream blocks' image and text attention (q, k, v, out) and MLPs, the single-stream block's fused
# qkv+MLP input and its output. ai-toolkit's and diffusers' Flux trainers target these (all of the blocks'
# Linear layers); the modulation, embedders and norm_out stay unadapted.
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
           "ff_context.linear_out", "attn.to_qkv_mlp_proj", "attn.to_out")
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
CASES = ("plain", "fused", "unfused_1", "unfused_3", "unfused_0")
# The library's sets, as a request names them (lora_library.parse_choice); fused holds lora_a at 1.0.
CHOICES = {"unfused_1": "lora_a", "unfused_3": "lora_a,lora_b:0.7,lora_c:0.5", "unfused_0": ""}
LORA_NAMES = ("lora_a", "lora_b", "lora_c")
LABELS = {"plain": "none", "fused": "lora_a fused at 1.0", "unfused_1": CHOICES["unfused_1"],
          "unfused_3": CHOICES["unfused_3"], "unfused_0": "3 loaded, none active"}
# The piece's depth: one block of each kind, klein 4B's widths (5 double and 20 single blocks in the real one).
PIECE_LAYERS = {"num_layers": 1, "num_single_layers": 1}
KLEIN_4B_CONFIG = Path(__file__).resolve().parents[2] / "flux2_klein" / "configs" / "flux2-klein-4b.json"
# The files whose working-tree state the measurement depends on: named in the report when uncommitted.
MEASURED_FILES = ("flux2_klein/lora_library.py", "flux2_klein/lora.py", "flux2_klein/torch_runtime.py",
                  "flux2_klein/networks.py", "client/bench/lora_cost.py")


# ------------------------------------------------------------------------------------- inputs


def targeted_layers(checkpoint: Path) -> dict[str, tuple[int, int]]:
    """The layers a LoRA adapts here: module name -> (in, out), from the weight headers (no weights loaded)."""
    from flux2_klein.lora_library import _base_shapes

    layers = {}
    for key, shape in _base_shapes(checkpoint).items():
        module = key.removesuffix(".weight")
        if (key.endswith(".weight") and len(shape) == 2 and module.startswith(BLOCKS)
                and any(module.endswith("." + t) for t in TARGETS)):
            layers[module] = (shape[1], shape[0])
    return layers


def write_lora(checkpoint: Path, path: Path, rank: int, seed: int) -> Path:
    """A rank-`rank` LoRA on every targeted layer, random A and B, saved as diffusers saves a PEFT LoRA. B is
    small (std 0.01/sqrt(rank)) so the fused model stays a plausible one; the cost does not depend on values."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (fan_in, fan_out) in targeted_layers(checkpoint).items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * fan_in**-0.5
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * (
            0.01 * rank**-0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def make_piece(tiny: Path, out: Path, seed: int = 0) -> Path:
    """A checkpoint folder whose transformer has klein 4B's layer sizes and PIECE_LAYERS' depth (random
    weights, float32 as the CPU leaf runs), the VAE config klein's (the DiT's channels come from it; no VAE
    weights: the DiT leaf never loads them), everything else linked from the tiny checkpoint `tiny`."""
    import torch
    from diffusers import Flux2Transformer2DModel

    klein = json.loads(KLEIN_4B_CONFIG.read_text())
    if (out / "transformer" / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for entry in ("model_index.json", "tokenizer", "scheduler", "text_encoder"):
        if not (out / entry).exists():
            os.symlink((tiny / entry).resolve(), out / entry)
    (out / "vae").mkdir(exist_ok=True)
    (out / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLFlux2", **klein["vae"]}))
    torch.manual_seed(seed)
    Flux2Transformer2DModel(**{**klein["transformer"], **PIECE_LAYERS}).eval().save_pretrained(
        out / "transformer", safe_serialization=True)
    return out


def flop_share(layers: dict[str, tuple[int, int]], rank: int) -> dict:
    """A rank-r LoRA's GEMM FLOPs against its base layers', per token: 2r(in+out) against 2*in*out per layer."""
    per_layer = {f"{i}x{o}": round(rank * (i + o) / (i * o), 5) for i, o in sorted(set(layers.values()))}
    total = sum(rank * (i + o) for i, o in layers.values()) / sum(i * o for i, o in layers.values())
    return {"targeted_layers": len(layers), "per_layer_shape": per_layer, "all_targeted": round(total, 5)}


# ------------------------------------------------------------------------------------- the run


def _summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    median = statistics.median(ms)
    return {"median_ms": round(median, 2), "min_ms": round(ms[0], 2), "max_ms": round(ms[-1], 2),
            "spread_pct": round(100 * (ms[-1] - ms[0]) / median, 1), "steps_per_s": round(1e3 / median, 3),
            "samples_ms": [round(s * 1e3, 2) for s in seconds]}


def measure(checkpoint: Path, work: Path, *, size: tuple[int, int], rank: int, rounds: int, warmup: int,
            loads: list) -> dict:
    """The five cases on `checkpoint` at `size` (width, height), interleaved; `loads` collects load averages."""
    import numpy as np
    import torch

    from flux2_klein.checkpoint import load_checkpoint
    from flux2_klein.lora import LoraSpec, fuse_loras
    from flux2_klein.lora_library import Adapters, parse_choice, scan
    from flux2_klein.specs import example_inputs, network_specs
    from flux2_klein.torch_runtime import as_served, load_leaf

    folder = work / "library"
    files = [write_lora(checkpoint, folder / f"{name}.safetensors", rank, seed=i + 1)
             for i, name in enumerate(LORA_NAMES)]
    fused_dir = work / "fused"
    if not fused_dir.exists():
        fuse_loras(checkpoint, [LoraSpec(files[0], 1.0)], fused_dir)
    start = time.perf_counter()
    library = scan(folder, checkpoint)
    scan_s = time.perf_counter() - start

    def leaf(path, lib=None):
        t = time.perf_counter()
        result = load_leaf(str(path), "transformer", dtype="fp32", device=torch.device("cpu"), lora_library=lib)
        return result, time.perf_counter() - t

    (plain, plain_s), (fused, fused_s), (served, library_s) = leaf(checkpoint), leaf(fused_dir), leaf(checkpoint,
                                                                                                      library)
    leaves = {"plain": plain, "fused": fused, "unfused_1": served, "unfused_3": served, "unfused_0": served}
    choices = {case: parse_choice(text, library.names) for case, text in CHOICES.items()}
    spec = network_specs(load_checkpoint(checkpoint))["transformer"]
    example = example_inputs(spec, np.random.default_rng(0), batch=1, size=size)
    times = {case: [] for case in CASES}
    outputs = {}
    switches = []
    with torch.inference_mode():
        args = as_served(example, spec, torch.device("cpu"))  # inference tensors, as a request's are
        for r in range(warmup + rounds):
            for case in CASES:
                if case in choices:
                    t = time.perf_counter()
                    served.adapters.activate(choices[case])
                    switches.append(time.perf_counter() - t)
                t = time.perf_counter()
                outputs[case] = leaves[case](*args)
                if r >= warmup:
                    times[case].append(time.perf_counter() - t)
            loads.append(os.getloadavg()[0])
    # The library's load on its own: the same Adapters the library leaf holds, into the plain leaf's module.
    t = time.perf_counter()
    Adapters(plain.module.transformer, library)
    adapters_s = time.perf_counter() - t

    # That each case computed what it is named for: LoRA a unfused = fused (to rounding), disabled = plain.
    def gap(a, b):
        return float((outputs[a] - outputs[b]).abs().max())

    check = {"unfused_1_vs_fused": gap("unfused_1", "fused"), "unfused_1_vs_plain": gap("unfused_1", "plain"),
             "unfused_3_vs_unfused_1": gap("unfused_3", "unfused_1"), "unfused_0_vs_plain": gap("unfused_0", "plain")}
    cases = {case: _summary(times[case]) for case in CASES}
    medians = {case: cases[case]["median_ms"] for case in CASES}
    layers = targeted_layers(checkpoint)
    tokens = int(example["hidden_states"].shape[1])
    return {
        "checkpoint_transformer": {k: v for k, v in load_checkpoint(checkpoint).transformer.items()
                                   if not k.startswith("_")},
        "size": f"{size[0]}x{size[1]}", "image_tokens": tokens,
        "text_tokens": int(example["encoder_hidden_states"].shape[1]),
        "rank": rank, "loras": LABELS,
        "rounds": rounds, "warmup_rounds": warmup, "cases": cases,
        "vs_plain": {case: round(medians[case] / medians["plain"], 3) for case in CASES},
        "vs_fused": {case: round(medians[case] / medians["fused"], 3) for case in CASES},
        "activate_ms": {"median": round(statistics.median(switches) * 1e3, 3),
                        "max": round(max(switches) * 1e3, 3), "count": len(switches)},
        "library_load_s": round(adapters_s, 3), "scan_s": round(scan_s, 3),
        "leaf_load_s": {"plain": round(plain_s, 2), "fused": round(fused_s, 2), "library": round(library_s, 2)},
        "flop_share": flop_share(layers, rank), "output_max_abs_diff": check,
    }


# ------------------------------------------------------------------------------------- the report


def _machine() -> dict:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]  # the repository: pathspecs are relative to the cwd
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *MEASURED_FILES], cwd=root,
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty]
    return head + (f" with uncommitted {', '.join(changed)}" if changed else "")


def markdown(report: dict) -> str:
    """The committed report: setup, one table per scale, and what it does and does not say about a GPU."""
    lines = [f"# Per-request LoRAs on the torch DiT leaf: unfused against fused ({report['date'][:10]})", "",
             f"- **Run:** {report['date']}, {report['machine']['cpu']} ({report['machine']['cores']} cores, "
             f"{report['machine']['memory_gb']} GB, no GPU), load average {report['load_average']['min']:.2f}-"
             f"{report['load_average']['max']:.2f} during the run (a machine shared with other jobs), "
             f"{report['threads']} torch thread(s) (the CPU leaf's `intra_op_threads`), fp32 (the CPU leaf's dtype).",
             f"- **Commit:** {report['commit']}.",
             f"- **Command:** `{report['command']}`",
             "- **What:** `torch_runtime.load_leaf(..., 'transformer')` as the served leaf loads it, one call = one "
             "step of a distilled model at batch 1, cases interleaved per round (client/bench/lora_cost.py's "
             "docstring). Spread = (max - min) / median over the rounds.", ""]
    for name, scale in report["scales"].items():
        t = scale["checkpoint_transformer"]
        lines += [f"## {name}: hidden {t['num_attention_heads'] * t['attention_head_dim']}, {t['num_layers']} double + "
                  f"{t['num_single_layers']} single blocks, {scale['size']} ({scale['image_tokens']} image + "
                  f"{scale['text_tokens']} text tokens), rank {scale['rank']}", "",
                  f"{scale['rounds']} rounds after {scale['warmup_rounds']} warm-up. LoRAs on "
                  f"{scale['flop_share']['targeted_layers']} layers; a LoRA's GEMM FLOPs are "
                  f"{100 * scale['flop_share']['all_targeted']:.2f}% of those layers' (2r(in+out) against 2*in*out "
                  "per token).", "",
                  "| case | LoRAs | median ms/step | min-max ms | spread | steps/s | vs plain | vs fused |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for case, c in scale["cases"].items():
            lines.append(f"| {case} | {LABELS[case]} | {c['median_ms']:,.1f} | {c['min_ms']:,.1f}-"
                         f"{c['max_ms']:,.1f} | {c['spread_pct']:.1f}% | {c['steps_per_s']:.3f} | "
                         f"{scale['vs_plain'][case]:.3f} | {scale['vs_fused'][case]:.3f} |")
        floor = 100 * abs(scale["vs_fused"]["plain"] - 1)
        lines += ["", f"plain and fused do the same work: their gap, {floor:.1f}%, beside spreads of "
                  f"{min(c['spread_pct'] for c in scale['cases'].values()):.0f}-"
                  f"{max(c['spread_pct'] for c in scale['cases'].values()):.0f}%, is a lower bound on this "
                  "run's noise; a gap of the same order between other cases is not resolved.", "",
                  f"One-off costs: `activate()` switching sets {scale['activate_ms']['median']:.2f} ms median "
                  f"(max {scale['activate_ms']['max']:.2f}, {scale['activate_ms']['count']} switches); loading the "
                  f"library of 3 into a loaded DiT (`Adapters`) {scale['library_load_s']:.2f} s; checking it at "
                  f"build (`scan`) {scale['scan_s']:.3f} s; `load_leaf` plain / fused / with the library "
                  + " / ".join(f"{v:.2f}" for v in scale["leaf_load_s"].values())
                  + " s (files in the page cache; weights first touched in the warm-up round).", ""]
    piece = report["scales"].get("piece")
    if piece:
        share = piece["flop_share"]["per_layer_shape"]
        lines += ["## What it means for an H100 (not measured there)", "",
                  "Nothing here ran on a GPU. What carries over is the arithmetic: per adapted layer and token a "
                  f"rank-{piece['rank']} LoRA adds 2r(in+out) FLOPs to the base's 2*in*out, i.e. "
                  + ", ".join(f"{100 * v:.2f}% for {k}" for k, v in share.items())
                  + f" ({100 * piece['flop_share']['all_targeted']:.2f}% over the targeted layers). On a CPU, "
                  "where a GEMM runs near its FLOP rate whatever its shape, the piece's unfused_1/fused ratio is "
                  "that share plus peft's per-layer overhead. On an H100 the thin GEMMs (N = r) are memory- and "
                  "launch-bound rather than FLOP-bound: each adapter adds about four kernels per layer "
                  "(x @ A^T, @ B^T, the scale, the add) and reads the layer's input again, so the overhead is "
                  "likely larger than the FLOP share, and it grows per active LoRA. A fused build also keeps "
                  "torch.compile and FP8, which a library leaf goes without (torch_runtime.load_leaf refuses "
                  "them together), so on a GPU the gap to measure is unfused-eager-bf16 against "
                  "fused-compiled-FP8, not only the LoRA GEMMs; this module runs on the CPU only.", ""]
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    from flux2_klein.sizes import parse_size

    return parse_size(text, "size")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m flux2_klein.client.bench.lora_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="tiny,piece", help="tiny, piece or both (default tiny,piece)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/flux2-klein-lora-cost"),
                        help="where checkpoints and LoRAs are written (reused when there)")
    parser.add_argument("--tiny-checkpoint", type=Path, help="an existing tiny checkpoint (default: made in --work)")
    parser.add_argument("--size", type=_size, default=(1024, 1024), help="the tiny scale's request size WxH")
    parser.add_argument("--piece-size", type=_size, default=(512, 512),
                        help="the piece's request size WxH (default 512x512: 1024 image tokens, for a CPU)")
    parser.add_argument("--rank", type=int, default=16, help="the LoRAs' rank (default 16)")
    parser.add_argument("--rounds", type=int, default=15, help="measured rounds at the tiny scale")
    parser.add_argument("--piece-rounds", type=int, default=4, help="measured rounds of the piece")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (not measured)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the CPU leaf)")
    parser.add_argument("--out", type=Path, help="write the report's JSON here")
    parser.add_argument("--markdown", type=Path, help="write the report's markdown here")
    args = parser.parse_args(argv)
    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    unknown = set(scales) - {"tiny", "piece"}
    if unknown or not scales:
        parser.error(f"--scales: {','.join(sorted(unknown)) or 'none'}; expected tiny, piece or both")

    import torch

    from flux2_klein.tiny import make_tiny

    tiny = args.tiny_checkpoint
    if tiny is None:
        tiny = args.work / "tiny"
        if not (tiny / "model_index.json").is_file():
            make_tiny(tiny, seed=0, distilled=True)
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    loads = [os.getloadavg()[0]]
    results = {}
    try:
        for scale in scales:
            if scale == "tiny":
                results[scale] = measure(tiny, args.work / "tiny-run", size=args.size, rank=args.rank,
                                         rounds=args.rounds, warmup=args.warmup, loads=loads)
            else:
                piece = make_piece(tiny, args.work / "piece")
                results[scale] = measure(piece, args.work / "piece-run", size=args.piece_size, rank=args.rank,
                                         rounds=args.piece_rounds, warmup=args.warmup, loads=loads)
    finally:
        torch.set_num_threads(before)
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": _machine(),
              "load_average": {"min": min(loads), "max": max(loads), "samples": loads},
              "commit": _commit(), "threads": args.threads, "dtype": "fp32",
              "command": "python -m flux2_klein.client.bench.lora_cost " + shlex.join(sys.argv[1:] if argv is None
                                                                                      else argv),
              "scales": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(report))
    for name, scale in results.items():
        print(name, json.dumps({c: v["median_ms"] for c, v in scale["cases"].items()}), "vs fused",
              json.dumps(scale["vs_fused"]))
    return report


if __name__ == "__main__":
    main()
