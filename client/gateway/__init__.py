"""`flux2-klein gateway`: a NIM-style HTTP API (docs/CONTRACT.md section 4; README "The HTTP API") in front
of Triton's gRPC endpoint.

    settings.py  flags and their environment variables     body.py     the request body, images
    guard.py     request ids, API key, size and load limits   metrics.py  Prometheus metrics
    app.py       the Triton connection and the routes         cli.py      the command

Importing this package (and building the command's parser) imports neither FastAPI nor uvicorn: `app`
does, when it is imported or a gateway runs.
"""

from .cli import add_gateway_parser, run_gateway, settings_from_args
from .settings import ENV, GatewaySettings, parse_bytes

__all__ = ["add_gateway_parser", "run_gateway", "settings_from_args", "GatewaySettings", "parse_bytes", "ENV"]
