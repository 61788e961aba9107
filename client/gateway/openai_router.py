"""The routes of OpenAI's Images API, POST /v1/images/generations and /v1/images/edits (the edit's multipart
form read here), and `OpenAIErrors`, which gives every error answered on /v1/images/* OpenAI's shape."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request

from .access import UNKNOWN
from .openai_protocol import ANSWER, IMAGES_PREFIX, MAX_FORM_FILES, openai_error, request_schemas
from .openai_serving import OpenAIServingImages
from .protocol import ApiError
from .responses import ImagesResponse


def openai_router(serving: OpenAIServingImages) -> APIRouter:
    """The two endpoints; their errors take OpenAI's shape in `OpenAIErrors`, which the app adds outermost."""
    router = APIRouter()
    schema, edit_schema = request_schemas()

    @router.post("/v1/images/generations", summary="Generate images (OpenAI's Images API)", responses=ANSWER,
                 openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}})
    async def generations(request: Request):
        state = request.scope["state"]
        answer = await serving.generations(await request.body(), state["request_id"], state.get("caller", UNKNOWN))
        return ImagesResponse(answer)

    @router.post("/v1/images/edits", summary="Edit images (OpenAI's Images API)", responses=ANSWER,
                 openapi_extra={"requestBody": {"required": True,
                                                "content": {"multipart/form-data": {"schema": edit_schema}}}})
    async def edits(request: Request):
        fields, images, mask = await _edit_form(request)
        state = request.scope["state"]
        answer = await serving.edits(fields, images, mask, state["request_id"], state.get("caller", UNKNOWN))
        return ImagesResponse(answer)

    return router


async def _edit_form(request: Request) -> tuple[dict[str, str], list[bytes], bytes | None]:
    """The edit's multipart form: its text fields, its image files in order, and its mask file."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, f"send multipart/form-data with one or more 'image' files; got {content_type or 'none'}")
    form = await request.form(max_files=MAX_FORM_FILES)
    fields, images, mask = {}, [], None
    for key, value in form.multi_items():
        if key in ("image", "image[]"):  # the openai client names a list of files image[]
            if isinstance(value, str):
                raise ApiError(422, f"image[{len(images)}]: expected a file (PNG, JPEG or WebP), got a text field")
            images.append(await value.read())
        elif key == "mask":
            if isinstance(value, str) or mask is not None:
                raise ApiError(422, "mask: expected one PNG file")
            mask = await value.read()
        elif not isinstance(value, str):
            raise ApiError(422, f"{key}: expected a text field, got a file")
        elif key in fields:
            raise ApiError(422, f"{key}: given more than once")
        else:
            fields[key] = value
    return fields, images, mask


class OpenAIErrors:
    """ASGI middleware, outermost: every error answered on /v1/images/* -- by a route, by FastAPI or by the
    guard (key, size, load) -- leaves in OpenAI's shape {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(IMAGES_PREFIX):
            await self.app(scope, receive, send)
            return
        held: dict = {}

        async def rewrite(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held["start"], held["body"] = message, b""
                return
            if message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start = held.pop("start")
                try:
                    detail = str(json.loads(held["body"])["detail"])
                except (ValueError, KeyError, TypeError):
                    detail = held["body"].decode("utf-8", "replace") or f"HTTP {start['status']}"
                status, body = openai_error(start["status"], detail)
                payload = json.dumps(body).encode()
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (
                    b"content-length", b"content-type")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": payload})
                return
            await send(message)

        await self.app(scope, receive, rewrite)
