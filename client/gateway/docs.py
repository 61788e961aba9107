"""GET /docs: Swagger UI, with its files served from the swagger-ui-bundle-v2 package (no CDN: an offline
cluster gets a working page). They are served as /docs?asset=NAME: /docs is the one docs path the API key
leaves open, and a browser can't add the key to the page's own script and style requests."""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from .protocol import ApiError

DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}


def add_docs_route(app: FastAPI) -> None:
    from fastapi.openapi.docs import get_swagger_ui_html

    @app.get("/docs", include_in_schema=False)
    async def docs(asset: str | None = None):
        if asset is None:
            return get_swagger_ui_html(
                openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
                swagger_js_url="/docs?asset=swagger-ui-bundle.js", swagger_css_url="/docs?asset=swagger-ui.css",
                swagger_favicon_url="/docs?asset=favicon-32x32.png")
        if asset not in DOCS_ASSETS:
            raise ApiError(404, f"asset: no such file {asset!r}; the docs page has {', '.join(DOCS_ASSETS)}")
        return Response(_docs_asset(asset), media_type=DOCS_ASSETS[asset],
                        headers={"Cache-Control": "public, max-age=86400"})


@functools.cache
def _docs_asset(name: str) -> bytes:
    from swagger_ui_bundle import swagger_ui_path

    return (Path(swagger_ui_path) / name).read_bytes()
