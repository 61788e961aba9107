"""`flux2-klein bench`'s command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flux2_klein.contract import MODEL_NAME
from flux2_klein.sizes import MAX_REFERENCES, SIZES, size_names

from ..generate import DEFAULT_WAIT_S, parse_size
from ..triton_client import DEFAULT_URLS
from .workload import BenchConfig, BenchError


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


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `bench` subcommand on an argparse subparsers object; its func is run_bench."""
    b = subparsers.add_parser(
        "bench", help="benchmark a running server with perf_analyzer and report",
        description=f"Load {MODEL_NAME} over gRPC at a range of concurrencies (perf_analyzer), read every model's "
                    "queue and compute time from Triton's statistics, compare with the same graphs run "
                    "directly, and write report.md, report.json and report.png.")
    b.add_argument("--url", default=DEFAULT_URLS["grpc"], metavar="HOST:PORT",
                   help=f"Triton's gRPC endpoint (default {DEFAULT_URLS['grpc']})")
    b.add_argument("--concurrency", type=parse_concurrency, default=parse_concurrency("1:8"),
                   metavar="START:END[:STEP]",
                   help="concurrency levels (default 1:8; also a list, e.g. 1,2,4,8)")
    b.add_argument("--sizes", type=parse_sizes, default=[(1024, 1024)], metavar="WxH,...",
                   help="output sizes, taken in turn (default 1024x1024)")
    b.add_argument("--references", type=parse_references, default=0, metavar="N",
                   help=f"reference images per request, 0..{MAX_REFERENCES} (default 0: text to image)")
    b.add_argument("--reference-size", type=parse_size, default=(1024, 1024), metavar="WxH",
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
                   help="the repository the server loaded, on this machine: also run its networks directly "
                        "(DirectPipeline: an onnxruntime repository's graphs, a torch repository's leaves) and compare")
    b.add_argument("--direct-threads", type=int, default=None, metavar="N",
                   help="threads per network in the direct run: ONNX Runtime's per graph, torch's for a torch "
                        "repository (default: as the Triton models)")
    b.add_argument("--no-direct", action="store_true", help="skip the direct comparison")
    b.add_argument("--load", choices=("auto", "perf_analyzer", "python"), default="auto",
                   help="load generator: perf_analyzer, tritonclient threads, or auto (perf_analyzer if one runs)")
    b.add_argument("--timeout", type=float, default=None, metavar="S", help="give up on a level after S seconds")
    b.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, metavar="S",
                   help=f"wait up to S seconds for Triton and the model to be ready, e.g. just after `serve` "
                        f"started (default {DEFAULT_WAIT_S:g}; 0: fail at once), as `generate` does")
    b.add_argument("--gateway", default=None, metavar="URL",
                   help="also send requests one at a time through the HTTP gateway at URL (serving this Triton) and "
                        "report its own cost per request: end to end minus Triton's time (key: $FLUX2_KLEIN_API_KEY)")
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
        progress=not args.quiet, gateway=args.gateway, wait_s=args.wait,
    )


def run_bench(args: argparse.Namespace) -> int:
    """0: report written (its path on stdout); 1: the benchmark could not run."""
    from .run import bench  # tritonclient, numpy and the rest load only when a benchmark runs

    try:
        report = bench(config_from_args(args))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    print(f"{out / 'report.md'}\t{len(report['levels'])} levels, load: {report['setup']['load']}")
    return 0


