"""The serving container's entrypoint: `python -m flux2_klein.entrypoint` (or `python -m flux2_klein.container`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from ..progress import log, setup_logging
from ..target import Target
from .cache import Stopped, prepare, stop_on_signals
from .settings import ENV_VARS, ConfigError, Settings
from .supervisor import Supervisor, healthcheck, server_children


def _env_help() -> str:
    width = max(len(name) for name, _, _ in ENV_VARS)
    lines = [f"  {name:<{width}}  {default or '(empty)':<18}  {meaning}" for name, default, meaning in ENV_VARS]
    return "environment (name, default, meaning):\n" + "\n".join(lines)


def main(argv: list[str] | None = None, *, target: Target | None = None,
         builder: Callable[..., object] | None = None) -> int:
    """The container's start (see the package's docstring); `target` and `builder` as in `cache.prepare`."""
    parser = argparse.ArgumentParser(
        prog="python -m flux2_klein.entrypoint",
        description="The serving container's entrypoint: check the checkpoint, reuse or build the Triton "
                    "repository for this GPU in the cache, then run tritonserver and the HTTP gateway.",
        epilog=_env_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--build-only", action="store_true",
                      help="prepare the repository in the cache, print its path and exit")
    mode.add_argument("--healthcheck", action="store_true",
                      help="exit 0 when the gateway answers /v1/health/ready, else 1")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    from ..checkpoint import CheckpointError

    try:
        settings = Settings.from_env()
    except ConfigError as e:
        log.error("%s", e)
        return 2
    if args.healthcheck:
        return healthcheck(settings.http_port)
    try:
        repository = prepare(settings, target=target, builder=builder)
    except (CheckpointError, ConfigError) as e:
        log.error("%s", e)
        return 2
    except Stopped as e:
        log.warning("stopped by %s while preparing the repository; nothing half-built was kept", e)
        return 128 + e.signum
    except Exception:
        log.exception("building the repository failed")
        return 1
    if args.build_only:
        print(repository, flush=True)
        return 0
    try:
        with stop_on_signals():  # until the supervisor's own handlers take over
            children = server_children(settings, repository)
    except FileNotFoundError as e:
        log.error("%s", e)
        return 2
    except Stopped as e:
        log.warning("stopped by %s before the servers started", e)
        return 128 + e.signum
    log.info("serving %s: gateway on port %d, Triton gRPC %d, metrics %d", repository, settings.http_port,
             settings.triton_grpc_port, settings.triton_metrics_port)
    return Supervisor(children, stop_timeout=settings.stop_timeout, reap=os.getpid() == 1).run()


if __name__ == "__main__":
    sys.exit(main())
