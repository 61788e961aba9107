"""What every API of the gateway shares (docs/CONTRACT.md section 4): `Generation`, the one request to Triton
each API's body becomes; `ApiError`, an answer other than 200; and the checks and messages that name a
field in the caller's terms. Each API's own request and answer models are in nim_protocol.py and
openai_protocol.py."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag
from starlette.responses import JSONResponse

from flux2_klein import contract as api
from flux2_klein import lora_library
from flux2_klein.request import MAX_PROMPT_CHARS
from flux2_klein.sizes import DEFAULT_SIZE, SIZES, size_names

RANDOM_SEED_BOUND = 2**32  # random seeds are 1..2**32-1, as NIM's image APIs use (never 0: NIM's "random")
INT64_MAX = 2**63 - 1
MAX_SAMPLES = 4  # images per request (NIM `samples`, OpenAI `n`); image i uses seed + i


def random_seed() -> int:
    return 1 + secrets.randbelow(RANDOM_SEED_BOUND - 1)


@dataclass
class Generation:
    """What one API request asks of Triton, whichever API it came in: `samples` images of one prompt and
    size, image i with seed `seed + i`. None leaves an input to the model's default (for width and height
    with references: the size nearest the first reference's aspect ratio)."""

    prompt: str
    seed: int
    samples: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    references: list[bytes] = field(default_factory=list)
    output_format: str = "png"
    output_quality: int | None = None  # JPEG/WebP quality; None: the client's documented default
    # NIM's flag, carried for the guardrail (which decides what it may switch off); the gateway itself has no
    # safety checker to disable.
    disable_safety_checker: bool = False
    # Inpainting / image-to-image: the picture to change (Triton's init_image), its mask (white repaints,
    # the picture's size; None: all repainted) and strength (None: the model's default).
    image: bytes | None = None
    mask: bytes | None = None
    strength: float | None = None
    padding_mask_crop: int | None = None  # NIM extension: Triton's input of that name
    # LoRAs of the server's library, in order, checked in form (check_loras); whether they are served is
    # Triton's call. (): none, and no `loras` input is sent (a repository without a library takes that too).
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.samples)]


class LoraChoice(BaseModel):
    """One LoRA of the server's library, in the list form of the `loras` field."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="a name GET /v1/loras lists")
    scale: float = Field(1.0, allow_inf_nan=False, description=f"its weight, -{lora_library.MAX_SCALE:g}.."
                                                                f"{lora_library.MAX_SCALE:g} (default 1)")


# The `loras` field's two forms; validated as the one its JSON type picks, so that an error is about that form
# alone (its tag is left out of the field's name: _field_name).
Loras = Annotated[Union[Annotated[str, Tag("str")], Annotated[list[LoraChoice], Tag("list[LoraChoice]")]],
                  Discriminator(lambda value: "list[LoraChoice]" if isinstance(value, list) else "str")]
# The models inside a body's fields, by field: what an unknown field there is told it may be.
NESTED_FIELDS = {"loras": list(LoraChoice.model_fields)}

LORAS_DESCRIPTION = (
    f"LoRAs of the server's library (GET /v1/loras) for this request: \"name:scale,name\" (scale default 1, "
    f"-{lora_library.MAX_SCALE:g}..{lora_library.MAX_SCALE:g}) or a list of {{\"name\", \"scale\"}}; at most "
    f"{lora_library.MAX_PER_REQUEST}, applied in order")


def body_schema(model: type[BaseModel]) -> dict:
    """A request model's JSON schema with its nested models written in place: it goes into the OpenAPI
    description as a route's body, where pydantic's "#/$defs/..." references would point nowhere."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(value):
        if isinstance(value, dict):
            if "$ref" in value:
                return inline(defs[value["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in value.items()}
        return [inline(v) for v in value] if isinstance(value, list) else value

    return inline(schema)


def check_loras(value: Loras | None, first: tuple[str, ...] = (),
                field: str = "loras") -> tuple[tuple[str, float], ...]:
    """The `loras` field (the wire form, or a list of LoraChoice) as (name, scale) pairs, after the LoRAs
    `first` names at scale 1 (OpenAI's `model` naming one); ApiError 422 naming the field when it is not a
    valid set (lora_library.parse_choice's rules). Names are not checked against the library: Triton does."""
    pairs = [(name, 1.0) for name in first]
    if isinstance(value, list):
        for i, item in enumerate(value):
            # Checked here, not by parse_choice: a name holding ',' or ':' would read as more than one entry.
            if not lora_library.NAME.fullmatch(item.name):
                raise ApiError(422, f"{field}[{i}]: {item.name!r} is not a LoRA name (letters, digits, '_', '.', "
                                    "'-', at most 64)")
        pairs += [(item.name, item.scale) for item in value]
        text = lora_library.format_choice(pairs)
    else:
        text = ",".join(filter(None, (lora_library.format_choice(pairs), value or "")))
    try:
        return lora_library.parse_choice(text)
    except ValueError as e:
        also = f" (with model's LoRA {first[0]!r} first)" if first else ""
        raise ApiError(422, f"{field}: {e}{also}") from None


class ApiError(Exception):
    """An answer other than 200, raised anywhere while serving a request."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


# Every answer other than 200 outside /v1/images/* (those take OpenAI's shape, openai_protocol.py). No
# docstring: it would become the schema's description in /openapi.json.
class ErrorBody(BaseModel):
    detail: str


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _describe_input(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    # A lone surrogate can't be sent back as UTF-8: show it escaped.
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 60 else text[:57] + "..."


def _field_name(loc) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part == "str" or re.fullmatch(r"list\[\w+\]", str(part)):  # a union member's tag, not a field
            continue
        else:
            name += ("." if name else "") + str(part)
    return name or "body"


def validation_detail(errors: list[dict], allowed: list[str]) -> str:
    """pydantic's errors as one message, each part naming its field: 'width: Input should be ... got "big"'."""
    parts = []
    for err in errors:
        field = _field_name(err.get("loc", ()))
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            top = re.match(r"[^.\[]*", field).group()
            fields = allowed if field == top else NESTED_FIELDS.get(top, [])
            parts.append(f"{field}: unknown field; allowed fields: {', '.join(fields)}" if fields else
                         f"{field}: unknown field")
        elif kind == "missing":
            parts.append(f"{field}: required")
        elif kind == "string_unicode":
            parts.append(f"{field}: not valid Unicode text (a lone surrogate)")
        elif kind == "too_long" and "max_length" in err.get("ctx", {}):
            ctx = err["ctx"]
            things = "images" if field == "image" else "entries"
            parts.append(f"{field}: at most {ctx['max_length']} {things}, got {ctx.get('actual_length', 'more')}")
        else:
            message = err.get("msg", "invalid")
            if "input" in err:
                message += f"; got {_describe_input(err['input'])}"
            parts.append(f"{field}: {message}")
    return "; ".join(parts)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(raw: bytes) -> dict:
    """A request body as a JSON object, or ApiError 400 (not JSON) / 422 (not an object)."""
    if not raw.strip():
        raise ApiError(400, 'request body is empty; expected a JSON object such as {"prompt": "a red fox"}')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 text (invalid byte at offset {e.start}); send JSON") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # NaN, Infinity
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:  # arrays or objects nested thousands deep: a client's doing, not ours
        raise ApiError(400, "request body nests JSON arrays or objects too deeply") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise ApiError(422, f'request body must be a JSON object such as {{"prompt": "a red fox"}}; got {kind}')
    return data


def check_prompt(prompt: str) -> None:
    if len(prompt) > MAX_PROMPT_CHARS:  # Triton's preprocess refuses it too; no need to send megabytes there
        raise ApiError(422, f"prompt: at most {MAX_PROMPT_CHARS} characters (only the first 512 tokens are used); "
                            f"got {len(prompt)}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(422, f"prompt: not valid Unicode text (a lone surrogate at character {e.start})") from None


def check_seeds(seed: int | None, count: int, count_field: str) -> None:
    if seed is not None and seed + count - 1 > INT64_MAX:
        raise ApiError(422, f"seed: with {count_field}={count}, at most {INT64_MAX - count + 1} (image i uses "
                            f"seed + i, an INT64)")


def check_size(width: int | None, height: int | None) -> None:
    if width is None and height is None:
        return
    pair = (DEFAULT_SIZE[0] if width is None else width, DEFAULT_SIZE[1] if height is None else height)
    if pair not in SIZES:
        raise ApiError(422, f"width/height: {pair[0]}x{pair[1]} (width x height) is not supported; allowed: "
                            f"{size_names()}")


# Triton's input names, as they start its INVALID_ARGUMENT messages, -> this API's field names.
_FIELD_NAMES = [
    (re.compile(r"\breference_images\b"), "image"),
    (re.compile(r"\binit_image\b"), "image[0]"),
    (re.compile(r"\bnum_inference_steps\b"), "steps"),
    (re.compile(r"\bguidance_scale\b"), "cfg_scale"),
    (re.compile(r"\bheight/width\b"), "width/height"),
]
# Where a message about one input starts: "height/width: ...", "reference_images[2]: ...", "seed: ...".
_FIELD_START = re.compile(r"\b(height/width|" + "|".join(map(re.escape, api.INPUT_NAMES)) + r")(?:\[\d+\])?:")


def api_message(triton_message: str) -> str:
    """A Triton INVALID_ARGUMENT message in this API's field names: 'reference_images[0]: ...' -> 'image[0]: ...'."""
    message = triton_message.strip()
    # The ensemble prefixes its step's message ("in ensemble 'flux2_klein', ..."): keep what names the field.
    m = _FIELD_START.search(message)
    if m:
        message = message[m.start():]
    for pattern, name in _FIELD_NAMES:
        message = pattern.sub(name, message)
    return message
