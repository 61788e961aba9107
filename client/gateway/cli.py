"""`flux2-klein gateway`'s command line. FastAPI and uvicorn are imported only when the gateway runs, so that
building the `flux2-klein` parser stays quick."""

from __future__ import annotations

import argparse
import logging
import math
import os

from .settings import DEFAULTS, ENV, GatewaySettings, parse_bytes

log = logging.getLogger("flux2_klein.gateway")


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _seconds(positive: bool):
    """An argparse type: a finite number of seconds, > 0 or >= 0."""
    what = "a positive number of seconds" if positive else "a number of seconds >= 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise argparse.ArgumentTypeError(f"expected {what}; got {text!r}")
        return value
    return parse


_positive_seconds, _non_negative_seconds = _seconds(True), _seconds(False)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port 0..65535; got {text!r}")
    return value


def _env_default(key: str) -> str | None:
    return os.environ.get(ENV[key], DEFAULTS.get(key))


def add_gateway_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `gateway` subcommand on an argparse subparsers object; its func is run_gateway.
    Each flag's default is read from its environment variable (see the module's docstring) when this runs."""
    g = subparsers.add_parser(
        "gateway",
        help="serve the NIM-style HTTP API (POST /v1/infer, health, models, metrics) in front of Triton's gRPC",
        description="A NIM-style HTTP gateway in front of Triton's gRPC endpoint. Every flag defaults to its "
                    "environment variable, named in its help.",
    )

    def env_help(text: str, key: str) -> str:
        return f"{text} (env {ENV[key]}; default {DEFAULTS.get(key, 'unset')})"

    def typed(convert, key: str):
        """convert, whose error also names the environment variable, since the value may have come from there."""
        def parse(text: str):
            try:
                return convert(text)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(f"{e} (from the flag, or else from {ENV[key]})") from None
        parse.__name__ = convert.__name__
        return parse

    g.add_argument("--host", default=_env_default("host"), help=env_help("address to listen on", "host"))
    g.add_argument("--port", type=typed(_port, "port"), default=_env_default("port"),
                   help=env_help("HTTP port; Triton's own HTTP port must then be another", "port"))
    g.add_argument("--triton-url", default=_env_default("triton_url"), metavar="HOST:PORT",
                   help=env_help("Triton's gRPC endpoint", "triton_url"))
    g.add_argument("--model", default=_env_default("model"), help=env_help("the Triton model to call", "model"))
    g.add_argument("--max-body-bytes", type=typed(parse_bytes, "max_body_bytes"), default=_env_default("max_body_bytes"), metavar="N",
                   help=env_help("largest request body; larger ones get 413", "max_body_bytes"))
    g.add_argument("--max-concurrency", type=typed(_positive_int, "max_concurrency"), default=_env_default("max_concurrency"), metavar="N",
                   help=env_help("most /v1/infer requests in flight; more get 429", "max_concurrency"))
    g.add_argument("--max-queue", type=typed(_non_negative_int, "max_queue"), default=_env_default("max_queue"),
                   metavar="N", help=env_help("requests that may wait for a slot when all are taken; more get 429",
                                              "max_queue"))
    g.add_argument("--queue-timeout", type=typed(_non_negative_seconds, "queue_timeout_s"),
                   default=_env_default("queue_timeout_s"), metavar="S",
                   help=env_help("seconds a request waits for a slot before 429", "queue_timeout_s"))
    g.add_argument("--body-timeout", type=typed(_positive_seconds, "body_timeout_s"),
                   default=_env_default("body_timeout_s"), metavar="S",
                   help=env_help("seconds a client may take to send its request body; then 408", "body_timeout_s"))
    g.add_argument("--timeout", type=typed(_positive_seconds, "timeout_s"), default=_env_default("timeout_s"), metavar="S",
                   help=env_help("seconds a /v1/infer request may take; then 504", "timeout_s"))
    g.add_argument("--retry-after", type=typed(_non_negative_int, "retry_after_s"), default=_env_default("retry_after_s"), metavar="S",
                   help=env_help("the Retry-After seconds of 429 and 503 answers", "retry_after_s"))
    g.add_argument("--api-key", default=os.environ.get(ENV["api_key"]) or None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' (health and docs stay open); prefer the env "
                        f"variable {ENV['api_key']}, since a flag shows in the process list (default: unset, open)")
    g.add_argument("--api-keys-file", default=_env_default("api_keys_file"), metavar="FILE",
                   help=env_help("named API keys, JSON {name: key | {key, per_minute}}; with "
                                 f"{ENV['api_keys']} (name=key,...) and {ENV['api_key']} (named default)",
                                 "api_keys_file"))
    g.add_argument("--rate-per-minute", type=typed(_non_negative_int, "rate_per_minute"),
                   default=_env_default("rate_per_minute"), metavar="N",
                   help=env_help("requests a minute per API key, or per client address without keys; beyond, "
                                 "429 with Retry-After (0: no limit)", "rate_per_minute"))
    g.set_defaults(func=run_gateway)
    return g


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    return GatewaySettings(
        triton_url=args.triton_url, model=args.model, max_body_bytes=args.max_body_bytes,
        max_concurrency=args.max_concurrency, max_queue=args.max_queue, queue_timeout_s=args.queue_timeout,
        body_timeout_s=args.body_timeout, timeout_s=args.timeout, retry_after_s=args.retry_after,
        api_key=args.api_key or None, api_keys=os.environ.get(ENV["api_keys"]) or None,
        api_keys_file=args.api_keys_file or None, rate_per_minute=args.rate_per_minute,
    )



def run_gateway(args: argparse.Namespace) -> int:
    """Run the gateway in the foreground until SIGINT/SIGTERM; 0 on a clean stop.

    On SIGTERM or SIGINT it stops taking requests, lets those in flight finish, then exits (uvicorn re-raises
    SIGTERM once shut down, so a supervisor sees status -15/143; SIGINT gives 130). It exits 3 when it
    cannot listen (e.g. the port is taken), and 2 for a bad flag or environment value.
    """
    import uvicorn

    from .app import create_app

    settings = settings_from_args(args)
    app = create_app(settings)
    log.info("gateway on http://%s:%d -> Triton gRPC %s, model %s (auth %s, at most %d in flight and %d waiting, "
             "timeout %g s)", args.host, args.port, settings.triton_url, settings.model,
             "on" if settings.api_key else "off", settings.max_concurrency, settings.max_queue, settings.timeout_s)
    verbose = getattr(args, "verbose", False)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="debug" if verbose else "info"))
    server.run()
    return 0 if server.started else 1

