"""`flux2-klein gateway`: NVIDIA NIM's and OpenAI's image APIs over HTTP (docs/CONTRACT.md section 4; README
"The HTTP API") in front of Triton's gRPC endpoint. Laid out as vLLM's entrypoints/openai: per API its
models (protocol), its service without HTTP (serving) and its routes (router); the command apart.

    cli.py              the command and its flags          settings.py      the settings, their env variables
    app.py              Gateway and create_app: handlers, routers, middleware, in that order
    protocol.py         Generation, ApiError, field-naming checks shared by the APIs
    nim_protocol.py     NIM's /v1/infer body and answer    openai_protocol.py  OpenAI's images fields, errors
    nim_serving.py      /v1/infer without HTTP             openai_serving.py   generations, edits without HTTP
    nim_router.py       POST /v1/infer                     openai_router.py    /v1/images/*, OpenAI-shaped errors
    serving.py          ImageService: Triton, readiness, generation, the audit line
    responses.py        encoding the images, base64 JSON   ops_router.py    health, models and LoRAs, metrics
    guard.py            request ids, API key, rate, body size and concurrency limits (one middleware)
    access.py           named API keys, the rate limiter   metrics.py       every counter, one object
    docs.py             /docs: Swagger UI from a package

Importing this package (and building the command's parser) imports neither FastAPI nor uvicorn: `app`
does, when it is imported or a gateway runs.
"""

from .cli import add_gateway_parser, run_gateway, settings_from_args
from .settings import ENV, GatewaySettings, parse_bytes

__all__ = ["add_gateway_parser", "run_gateway", "settings_from_args", "GatewaySettings", "parse_bytes", "ENV"]
