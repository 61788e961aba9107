"""Image generation for every API of the gateway, without HTTP: `ImageService` holds the connection to
Triton, answers readiness, and turns a `Generation` into its images (or an `ApiError`), with one audit line
and one outcome count per request. nim_serving.py and openai_serving.py put their API's body in and its
answer out."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass

import numpy as np

from flux2_klein.contract import OUTPUT
from flux2_klein.lora_library import format_choice
from flux2_klein.sizes import DEFAULT_SIZE

from ..triton_client import INVALID_ARGUMENT, LORA_NAMES_MODEL, build_inputs, lora_names_of, to_generation_error
from .access import UNKNOWN, Caller
from .metrics import Metrics
from .protocol import ApiError, Generation, api_message, check_size
from .responses import encode_image_async
from .settings import ENV, GatewaySettings

log = logging.getLogger("flux2_klein.gateway")

READY_TIMEOUT_S = 3.0  # how long /v1/health/ready waits for Triton's answers


@dataclass
class Image:
    """One generated image, encoded."""

    seed: int
    data: bytes
    width: int
    height: int
    finish_reason: str = "SUCCESS"


def audit(request_id: str, caller: Caller, gen: Generation, outcome: str) -> None:
    """One log line per image request: who (the key's name or the address), a hash of the prompt (never the
    prompt), and what came of it."""
    log.info("audit request=%s caller=%s prompt_sha256=%s samples=%d outcome=%s", request_id, caller,
             hashlib.sha256(gen.prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16], gen.samples, outcome)


class ImageService:
    """One gateway's connection to Triton, and what it asks of it."""

    def __init__(self, settings: GatewaySettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.client = None  # tritonclient.grpc.aio.InferenceServerClient, made inside the event loop
        self.created = int(time.time())
        self._lora_names: tuple[str, ...] = ()  # what Triton last said it serves (lora_names)

    async def open(self) -> None:
        # Why tritonclient.grpc.aio rather than the synchronous Flux2KleinClient in a thread pool: an await
        # holds no thread, so the concurrency limit costs nothing per request; and a timeout cancels the
        # awaiting task, which cancels the gRPC call itself (Triton sees the cancellation), where a thread
        # blocked in a synchronous call could not be interrupted and would hold its worker past the 504.
        # From the synchronous client we reuse what is protocol-level: build_inputs (the InferInput objects
        # are the same class for both) and to_generation_error (the same exceptions).
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as aioclient

        keepalive = grpcclient.KeepAliveOptions()
        channel_args = [
            ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            # gRPC's reconnect backoff grows to 120 s by default: a gateway started before Triton would then
            # stay "not ready" for up to two minutes after Triton is. Retry every second or two instead.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self.client = aioclient.InferenceServerClient(self.settings.triton_url, channel_args=channel_args)

    async def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
            self.client = None

    async def readiness(self) -> tuple[bool, str]:
        from tritonclient.utils import InferenceServerException

        where = f"Triton at {self.settings.triton_url}"
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                if not await self.client.is_server_ready(client_timeout=READY_TIMEOUT_S):
                    return False, f"{where} is not ready"
                if not await self.client.is_model_ready(self.settings.model, client_timeout=READY_TIMEOUT_S):
                    return False, f"model {self.settings.model} is not ready in {where}"
        except TimeoutError:
            return False, f"{where} did not answer within {READY_TIMEOUT_S} s"
        except InferenceServerException as e:
            return False, to_generation_error(e, self.settings.triton_url, "grpc", READY_TIMEOUT_S).message
        return True, f"{where} and model {self.settings.model} are ready"

    async def lora_names(self, wanted: str | None = None) -> tuple[str, ...]:
        """The names of the LoRA library Triton serves (its preprocess model's config), in name order; () for a
        repository without one. Read when first needed and kept; read again while none are known, or when
        `wanted` is not among them (the server may have been rebuilt with a new library since). ApiError 503
        when Triton can't be asked."""
        from tritonclient.utils import InferenceServerException

        if self._lora_names and (wanted is None or wanted in self._lora_names):
            return self._lora_names
        s = self.settings
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                config = await self.client.get_model_config(LORA_NAMES_MODEL, client_timeout=READY_TIMEOUT_S)
        except TimeoutError:
            why = f"Triton at {s.triton_url} did not answer within {READY_TIMEOUT_S} s"
        except InferenceServerException as e:
            why = to_generation_error(e, s.triton_url, "grpc", READY_TIMEOUT_S).message
        else:
            self._lora_names = lora_names_of(config)
            return self._lora_names
        log.warning("cannot read the served LoRA names: %s", why)
        raise ApiError(503, f"cannot read the served LoRA names from the inference server ({why}); retry later",
                       {"Retry-After": str(s.retry_after_s)})

    async def generate(self, gen: Generation, request_id: str, caller: Caller = UNKNOWN) -> list[Image]:
        """`generate_images`, then the request's audit line and its outcome in the metrics."""
        outcome = "error"
        try:
            images = await self.generate_images(gen, request_id)
            outcome = ",".join(sorted({image.finish_reason for image in images}))
            return images
        finally:
            self.metrics.outcome(caller.key, outcome)
            audit(request_id, caller, gen, outcome)

    async def generate_images(self, gen: Generation, request_id: str) -> list[Image]:
        """A Generation -> its images, in seed order; ApiError for every failure.

        Several samples go to Triton as concurrent requests, one per seed, not one after another: the sampler is
        a dynamically batched model, so requests of one shape that arrive together share one denoising loop,
        and each image is exactly the single request with its seed."""
        from tritonclient.utils import InferenceServerException

        s = self.settings
        check_size(gen.width, gen.height)
        deadline = time.monotonic() + s.timeout_s
        timeout_detail = f"no image within {s.timeout_s:g} s (the gateway's --timeout / {ENV['timeout_s']})"
        try:
            async with asyncio.timeout(s.timeout_s):
                try:
                    async with asyncio.TaskGroup() as group:
                        tasks = [group.create_task(self._one(gen, seed, request_id, i, deadline))
                                 for i, seed in enumerate(gen.seeds)]
                except BaseExceptionGroup as failed:  # the first failure speaks for the request
                    raise failed.exceptions[0] from None
                return [task.result() for task in tasks]
        except TimeoutError:
            raise ApiError(504, timeout_detail) from None
        except InferenceServerException as e:
            error = to_generation_error(e, s.triton_url, "grpc", s.timeout_s)
            retry = {"Retry-After": str(s.retry_after_s)}
            if error.status == INVALID_ARGUMENT:
                raise ApiError(422, api_message(error.message)) from None
            if error.status == "DEADLINE_EXCEEDED":
                raise ApiError(504, timeout_detail) from None
            log.error("request %s: Triton %s: %s", request_id, error.status, error.message)
            if error.status in ("UNAVAILABLE", "NOT_FOUND", "RESOURCE_EXHAUSTED", "CANCELLED"):
                detail = (f"the inference server is unavailable ({error.status}; model {s.model} at "
                          f"{s.triton_url}); retry later")
                raise ApiError(503, detail, retry) from None
            raise ApiError(502, f"the inference server failed this request ({error.status}, request "
                                f"{request_id}); the gateway's log has its message") from None

    async def _one(self, gen: Generation, seed: int, request_id: str, index: int, deadline: float) -> Image:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        from flux2_klein.guardrail.core import filtered_stage

        s = self.settings
        inputs = build_inputs(
            gen.prompt, width=gen.width, height=gen.height, seed=seed, steps=gen.steps, guidance=gen.guidance,
            references=gen.references, protocol="grpc",
            disable_safety_checker=True if gen.disable_safety_checker else None,
            image=gen.image, mask=gen.mask, strength=gen.strength, padding_mask_crop=gen.padding_mask_crop,
            loras=format_choice(gen.loras) if gen.loras else None,
        )
        triton_id = request_id if gen.samples == 1 else f"{request_id}.{index}"
        try:
            result = await self.client.infer(
                s.model, inputs, outputs=[grpcclient.InferRequestedOutput(OUTPUT.name)], request_id=triton_id,
                client_timeout=max(deadline - time.monotonic(), 0.001),
            )
        except InferenceServerException as e:
            stage = filtered_stage(e.message() or "")
            if stage is None:
                raise
            # NIM's answer to a refused request: the artifact says CONTENT_FILTERED, and its image is black
            # (nothing of what was asked or generated leaves); the guardrail's audit line has the details.
            log.info("request %s: content filtered (%s)", triton_id, stage)
            width, height = (gen.width or DEFAULT_SIZE[0], gen.height or DEFAULT_SIZE[1])
            black = np.zeros((height, width, 3), dtype=np.uint8)
            encoded = await encode_image_async(black, gen.output_format, gen.output_quality)
            return Image(seed=seed, data=encoded, width=width, height=height, finish_reason="CONTENT_FILTERED")
        image = result.as_numpy(OUTPUT.name)
        if image is None or image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 3:
            got = "nothing" if image is None else f"{image.dtype} {list(image.shape)}"
            log.error("request %s: %s answered %s for 'image'", triton_id, s.model, got)
            raise ApiError(502, f"the inference server answered an unusable image (request {request_id})")
        encoded = await encode_image_async(image, gen.output_format, gen.output_quality)
        return Image(seed=seed, data=encoded, width=image.shape[1], height=image.shape[0])
