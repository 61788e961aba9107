"""`flux2-klein bench`: load the Triton model `flux2_klein` at a range of concurrencies and report.

    flux2-klein bench --url HOST:PORT [--concurrency 1:8] [--sizes 1024x1024,...] [--references N]
                      [--requests N] [--repository REPO] [--wait S] [--out DIR]

Per concurrency level: perf_analyzer's load over gRPC (`load.py`; tritonclient threads where no
perf_analyzer runs, and the report says why), the client's latency percentiles, and every model's queue
and compute time from Triton's statistics before and after the level (`stats.py`). Serving overhead two
ways: (a) end-to-end latency against the leaf models' compute per request; (b) with --repository, the
same graphs in this process through `flux2_klein.direct.DirectPipeline`. Goals, reported and not
enforced: under 10 ms (stats.OVERHEAD_GOAL_MS) of overhead per request, more images/s than the direct loop at concurrency >= 2.
Writes report.md, report.json and report.png (`report.py`) and per level the input data, perf_analyzer's
CSV and its log.

    workload.py  the config and the requests     load.py    perf_analyzer, threads, the direct loop
    stats.py     Triton's statistics, overhead   report.py  the report files
    progress.py  the progress line               run.py     one run, phase by phase
    cli.py       the command
"""

from .cli import add_bench_parser, config_from_args, parse_concurrency, run_bench
from .workload import BenchConfig, BenchError

__all__ = ["add_bench_parser", "run_bench", "config_from_args", "BenchConfig", "BenchError", "parse_concurrency"]
