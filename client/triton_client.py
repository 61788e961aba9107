"""A small client for the Triton model `flux2_klein` (CONTRACT.md section 3), over gRPC or HTTP.

    from flux2_klein.client import Flux2KleinClient

    with Flux2KleinClient("localhost:8001") as client:          # or ("localhost:8000", protocol="http")
        image = client.generate("a red fox in the snow", width=1024, height=1024, seed=7)
    # image: numpy uint8 [height, width, 3], RGB

Optional inputs left as None are not sent at all, so the server's defaults apply (1024x1024, seed 0,
the checkpoint's own number of steps and guidance). Every failure -- a bad input, an unreachable server,
a timeout, a server-side error -- is raised as one exception type, `GenerationError(status, message)`,
whose status is "INVALID_ARGUMENT" exactly when the request itself was at fault.

tritonclient is imported lazily, per protocol: the HTTP client pulls in gevent, the gRPC one grpcio.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from flux2_klein.contract import MODEL_NAME, OUTPUT, Reference, input_arrays
from flux2_klein.lora_library import served_names

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_TIMEOUT_S = 600.0
# The ensemble's first step: its config's parameters list the LoRA names the repository serves (repository.py).
LORA_NAMES_MODEL = "preprocess"
# How often a wait for readiness asks the server, and how often it says it is still waiting.
_READY_POLL_S = 0.5
_READY_REPORT_S = 5.0

log = logging.getLogger("flux2_klein.client")

INVALID_ARGUMENT = "INVALID_ARGUMENT"
UNAVAILABLE = "UNAVAILABLE"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"

# Triton's HTTP front end answers with these codes for its error kinds; we report the gRPC names, so a
# caller sees the same status whichever protocol it used.
_HTTP_STATUS = {
    400: INVALID_ARGUMENT,
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}
# A gRPC UNAVAILABLE that came from the transport (nothing listening, unknown host), not from Triton.
_CONNECT_FAILURE = re.compile(r"connect|refused|resolution|resolve|unreachable|socket closed", re.IGNORECASE)


class GenerationError(Exception):
    """A request that produced no image.

    status: "INVALID_ARGUMENT" when the request was at fault (gRPC INVALID_ARGUMENT, HTTP 400) -- the
    message then names the input and what is allowed; otherwise another gRPC status name, e.g.
    "UNAVAILABLE" (server unreachable or not ready), "DEADLINE_EXCEEDED", "NOT_FOUND", "INTERNAL".
    message: the server's message, or ours naming the URL when the server could not be reached.
    """

    def __init__(self, status: str, message: str):
        super().__init__(status, message)
        self.status = status
        self.message = message

    @property
    def invalid_argument(self) -> bool:
        return self.status == INVALID_ARGUMENT

    def __str__(self) -> str:
        return f"[{self.status}] {self.message}"


def default_url(protocol: str) -> str:
    """Triton's default endpoint for a protocol: localhost:8001 for gRPC, localhost:8000 for HTTP."""
    _check_protocol(protocol)
    return DEFAULT_URLS[protocol]


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")


def _tc(protocol: str):
    """The tritonclient module of a protocol, imported on first use."""
    _check_protocol(protocol)
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


# ---------------------------------------------------------------------------------------------------------------
# Request tensors
# ---------------------------------------------------------------------------------------------------------------

def build_inputs(prompt: str, *, protocol: str = "grpc", **request: Any) -> list:
    """tritonclient InferInput objects (of `protocol`'s module) for one request; `request` holds
    `contract.input_arrays`' keyword arguments (width, height, seed, steps, guidance, references)."""
    tc = _tc(protocol)
    inputs = []
    for name, (datatype, array) in input_arrays(prompt, **request).items():
        inp = tc.InferInput(name, list(array.shape), datatype)
        if protocol == "http":
            inp.set_data_from_numpy(array, binary_data=True)  # raw bytes: image files aren't JSON strings
        else:
            inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


# ---------------------------------------------------------------------------------------------------------------
# Responses and errors
# ---------------------------------------------------------------------------------------------------------------

def _proto_to_dict(message) -> dict:
    """A protobuf message as the dict Triton's HTTP API gives: int64 as int (MessageToJson makes them
    strings), enums by name, every field present with its default."""
    from google.protobuf.descriptor import FieldDescriptor

    def value_of(field, value):
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            return _proto_to_dict(value)
        if field.type == FieldDescriptor.TYPE_ENUM:
            return field.enum_type.values_by_number[value].name
        return value

    out = {}
    for field in message.DESCRIPTOR.fields:
        if field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name) != field.name:
            continue
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: value_of(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [value_of(field, v) for v in value]
        else:
            out[field.name] = value_of(field, value)
    return out


def config_parameters(config) -> dict[str, str]:
    """A model's config parameters as {name: string_value}, from what either protocol's get_model_config gives:
    gRPC's ModelConfigResponse (protobuf) or HTTP's config dict."""
    if isinstance(config, dict):
        return {k: (v or {}).get("string_value", "") for k, v in config.get("parameters", {}).items()}
    return {k: v.string_value for k, v in config.config.parameters.items()}


def lora_names_of(config) -> tuple[str, ...]:
    """The LoRA names a repository serves, from its preprocess model's config (either protocol's form); ()
    for a repository without a library (or built before there were libraries)."""
    return served_names(config_parameters(config))


def to_generation_error(error: BaseException, url: str, protocol: str, timeout_s: float | None = None) -> GenerationError:
    """One GenerationError for whatever tritonclient (or the socket under it) raised."""
    from tritonclient.utils import InferenceServerException

    where = f"Triton at {url} ({protocol})"
    if isinstance(error, InferenceServerException):
        raw = error.status()
        message = error.message() or str(error)
        if raw is None:  # raised by tritonclient itself, before or after the server
            return GenerationError("UNKNOWN", f"{where}: {message}")
        raw = str(raw)
        if raw.isdigit():  # HTTP
            status = _HTTP_STATUS.get(int(raw), f"HTTP_{raw}")
        else:  # gRPC: "StatusCode.INVALID_ARGUMENT"
            status = raw.rsplit(".", 1)[-1]
        if status == UNAVAILABLE and protocol == "grpc" and _CONNECT_FAILURE.search(message):
            return GenerationError(UNAVAILABLE, f"cannot reach {where}: {message}; is the server running?")
        if status == DEADLINE_EXCEEDED:
            return GenerationError(status, f"no answer from {where} within {timeout_s} s: {message}")
        if status == UNAVAILABLE:
            return GenerationError(status, f"{where} is unavailable: {message}")
        return GenerationError(status, message)
    if isinstance(error, TimeoutError):  # socket.timeout, from the HTTP client's network timeout
        return GenerationError(DEADLINE_EXCEEDED, f"no answer from {where} within {timeout_s} s")
    if isinstance(error, OSError):  # ConnectionRefusedError, unknown host, ... from the HTTP client
        reason = error.strerror or str(error) or type(error).__name__
        return GenerationError(UNAVAILABLE, f"cannot reach {where}: {reason}; is the server running?")
    return GenerationError("UNKNOWN", f"{where}: {type(error).__name__}: {error}")


# ---------------------------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------------------------

class Flux2KleinClient:
    """One connection to a Triton server that serves `flux2_klein`.

    url: HOST:PORT of Triton's gRPC (default 8001) or HTTP (default 8000) endpoint.
    timeout_s: the longest a call may take, end to end (gRPC deadline; HTTP network timeout). The
    first request after a server start includes any lazy initialisation, so keep it generous.
    wait_s: before the first request, wait up to this long for the server to answer and the model to be
    ready (Triton opens its ports only once every model has loaded, tens of seconds after `serve`
    starts), logging at INFO every few seconds while waiting; 0 (default) sends at once.
    """

    def __init__(
        self,
        url: str = DEFAULT_URLS["grpc"],
        protocol: str = "grpc",
        model: str = MODEL_NAME,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        wait_s: float = 0.0,
        verbose: bool = False,
    ):
        _check_protocol(protocol)
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds; got {timeout_s!r}")
        if wait_s is None or wait_s < 0:
            raise ValueError(f"wait_s must be 0 or a positive number of seconds; got {wait_s!r}")
        self._pending_wait_s = float(wait_s)
        self.url, self.protocol, self.model, self.timeout_s = url, protocol, model, float(timeout_s)
        tc = _tc(protocol)
        try:
            if protocol == "grpc":
                self._client = tc.InferenceServerClient(url, verbose=verbose)
            else:
                self._client = tc.InferenceServerClient(
                    url, verbose=verbose, connection_timeout=min(self.timeout_s, 30.0), network_timeout=self.timeout_s
                )
        except Exception as e:  # a malformed URL
            raise to_generation_error(e, url, protocol, self.timeout_s) from e
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------------------------

    def _kw(self) -> dict:
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def _call(self, fn, *args, **kwargs):
        if self._closed:
            raise GenerationError("CANCELLED", f"the client of {self.url} is closed")
        try:
            return fn(*args, **kwargs)
        except GenerationError:
            raise
        except Exception as e:
            raise to_generation_error(e, self.url, self.protocol, self.timeout_s) from e

    # -- API ----------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        references: Iterable[Reference] = (),
        image: Reference | None = None,
        mask: Reference | None = None,
        strength: float | None = None,
        padding_mask_crop: int | None = None,
        loras=None,
    ) -> np.ndarray:
        """One image, as numpy uint8 [height, width, 3] RGB. None means "not sent": the server's default.

        references: encoded image files (PNG, JPEG, WebP) as bytes, or paths to them; at most 4 (3 with image).
        image: the picture to change (inpainting; image-to-image without a mask), a file's bytes or path;
        mask: white repaints, black keeps, the image's size; strength: 0..1 (the server's default 0.8);
        padding_mask_crop: inpaint only the box around the mask grown by this many pixels, pasted back.
        loras: LoRAs of the server's library, "name:scale,name" or {name: scale} (a repository built with
        --lora-library).
        Raises GenerationError; a bad input gives status "INVALID_ARGUMENT" with the server's message.
        """
        if self._pending_wait_s:
            self.wait_until_ready(self._pending_wait_s)
            self._pending_wait_s = 0.0
        tc = _tc(self.protocol)
        inputs = build_inputs(
            prompt, width=width, height=height, seed=seed, steps=steps, guidance=guidance,
            references=references, image=image, mask=mask, strength=strength,
            padding_mask_crop=padding_mask_crop, loras=loras, protocol=self.protocol,
        )
        if self.protocol == "http":
            outputs = [tc.InferRequestedOutput(OUTPUT.name, binary_data=True)]
        else:
            outputs = [tc.InferRequestedOutput(OUTPUT.name)]
        result = self._call(self._client.infer, self.model, inputs, outputs=outputs, **self._kw())
        image = result.as_numpy(OUTPUT.name)
        if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = "nothing" if image is None else f"{image.dtype} {list(image.shape)}"
            raise GenerationError("INTERNAL", f"{self.model} answered {got} for 'image'; expected UINT8 [H, W, 3]")
        return np.ascontiguousarray(image)

    def is_ready(self) -> bool:
        """Whether the server answers and `model` is ready; False (never an error) when it can't be reached."""
        try:
            return bool(self._call(self._client.is_model_ready, self.model, **self._kw()))
        except GenerationError:
            return False

    def _not_ready_reason(self) -> tuple[str, str]:
        """(short, full) reasons why the model can't take a request now; ("", "") when it can."""
        try:
            if self._call(self._client.is_model_ready, self.model, **self._kw()):
                return "", ""
        except GenerationError as e:
            if e.status == UNAVAILABLE and e.message.startswith("cannot reach"):
                # Triton opens its ports only after loading every model: refused connections are the norm.
                return f"nothing listens at {self.url} yet (Triton opens its ports once its models are loaded)", \
                    e.message
            return e.message, e.message
        why = f"Triton at {self.url} answers but {self.model} is not ready yet"
        return why, why

    def wait_until_ready(self, timeout_s: float, on_wait: Callable[[float, str], None] | None = None, *,
                         report_every_s: float = _READY_REPORT_S) -> None:
        """Block until `model` is ready, at most timeout_s seconds. While waiting, every report_every_s,
        on_wait(seconds waited, why not ready) is called (default: an INFO log line). Raises
        GenerationError("UNAVAILABLE") with the last reason when the time is up."""
        start = time.monotonic()
        next_report = start + report_every_s
        while True:
            why, full = self._not_ready_reason()
            if not why:
                return
            now = time.monotonic()
            if now - start >= timeout_s:
                raise GenerationError(UNAVAILABLE, f"not ready after waiting {timeout_s:g} s: {full}")
            if now >= next_report:
                next_report = now + report_every_s
                if on_wait is not None:
                    on_wait(now - start, why)
                else:
                    log.info("waiting for %s at %s (%.0f s of %g s): %s", self.model, self.url, now - start,
                             timeout_s, why)
            time.sleep(min(_READY_POLL_S, max(timeout_s - (now - start), 0.0)))

    def model_metadata(self) -> dict:
        """The model's KServe metadata: {"name", "versions", "platform", "inputs": [...], "outputs": [...]}."""
        if self.protocol == "grpc":
            return _proto_to_dict(self._call(self._client.get_model_metadata, self.model, **self._kw()))
        return self._call(self._client.get_model_metadata, self.model)

    def statistics(self) -> dict:
        """Triton's statistics of `model` alone (an ensemble's steps are models with statistics of their own):
        {"model_stats": [{"name", "version", "inference_count", "execution_count", "inference_stats": {...}, ...}]}
        with the same keys and integer types over either protocol."""
        if self.protocol == "grpc":
            return _proto_to_dict(self._call(self._client.get_inference_statistics, self.model, **self._kw()))
        return self._call(self._client.get_inference_statistics, self.model)

    def lora_names(self) -> tuple[str, ...]:
        """The names of the server's LoRA library, what `generate(loras=...)` may name, in name order; () when
        the repository serves none (built without --lora-library)."""
        if self.protocol == "grpc":
            return lora_names_of(self._call(self._client.get_model_config, LORA_NAMES_MODEL, **self._kw()))
        return lora_names_of(self._call(self._client.get_model_config, LORA_NAMES_MODEL))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._client.close()
            except Exception:
                pass

    def __enter__(self) -> Flux2KleinClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Flux2KleinClient(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r})"


__all__ = [
    "Flux2KleinClient", "GenerationError", "build_inputs", "input_arrays", "default_url", "to_generation_error",
    "lora_names_of", "MODEL_NAME", "PROTOCOLS", "DEFAULT_URLS", "INVALID_ARGUMENT",
]
