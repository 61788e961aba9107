"""The container's settings, all from environment variables (`ENV_VARS`: name, default, meaning)."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..contract import PRECISIONS, TENSORRT_PRECISION

# Of contract.RUNTIMES, the two the image builds (cache.build_for_runtime): TensorRT on its GPU, the default,
# and ONNX Runtime, the CPU path for checks. The torch runtime is not built in the container.
RUNTIMES = ("tensorrt", "onnxruntime")

# (name, default, meaning): the container's whole configuration surface.
ENV_VARS: tuple[tuple[str, str, str], ...] = (
    ("FLUX2_KLEIN_CHECKPOINT", "/models/checkpoint", "the checkpoint folder (diffusers layout), mounted read-only"),
    ("FLUX2_KLEIN_CACHE", "/cache", "writable volume for built repositories: <cache>/<profile-key>/repository"),
    ("FLUX2_KLEIN_PRECISION", TENSORRT_PRECISION, "precision of the TensorRT engines: " + " | ".join(PRECISIONS)),
    ("FLUX2_KLEIN_RUNTIME", RUNTIMES[0], "what runs the networks: tensorrt (GPU) | onnxruntime (CPU, for checks)"),
    ("FLUX2_KLEIN_GATEWAY_PORT", "8000", "the gateway's port (NIM-style /v1 API): the one port to publish. "
                                         "The gateway's other FLUX2_KLEIN_GATEWAY_* variables reach it as they are"),
    ("FLUX2_KLEIN_TRITON_GRPC_PORT", "8001", "Triton's gRPC port, which the gateway talks to"),
    ("FLUX2_KLEIN_TRITON_METRICS_PORT", "8002", "Triton's Prometheus metrics (all interfaces, for scraping)"),
    ("FLUX2_KLEIN_TRITON_HTTP_PORT", "8003", "Triton's own KServe HTTP port (readiness, debugging)"),
    ("FLUX2_KLEIN_TRITON_ADDRESS", "127.0.0.1", "interface Triton's HTTP and gRPC ports bind; 0.0.0.0 exposes them"),
    ("FLUX2_KLEIN_API_KEY", "", "the gateway's bearer key (its own variable), kept from tritonserver's "
                                "environment; empty: no authentication"),
    ("FLUX2_KLEIN_GATEWAY_ARGS", "", "extra arguments appended to the gateway's command line"),
    ("FLUX2_KLEIN_GATEWAY_COMMAND", "", "replaces the gateway's command line (default: flux2-klein gateway ...)"),
    ("FLUX2_KLEIN_TRITON_COMMAND", "", "replaces tritonserver's command line (tests, debugging); it gets "
                                 "FLUX2_KLEIN_REPOSITORY in its environment"),
    ("FLUX2_KLEIN_ONNX_DIR", "", "reuse graphs already written by `flux2-klein export onnx` instead of exporting"),
    ("FLUX2_KLEIN_CHECKPOINT_REVISION", "", "any string mixed into the profile key (e.g. the checkpoint's commit); "
                                      "change it when weights changed where the fingerprint does not look"),
    ("FLUX2_KLEIN_LORAS", "", "klein LoRAs fused into the weights before the build, FILE[:SCALE] comma-separated "
                             "(mounted read-only); their bytes and scales are part of the profile key"),
    ("FLUX2_KLEIN_LORA_LIBRARY", "", "refused here: LoRAs chosen per request run on the torch runtime, which the "
                                    "container does not serve; fuse LoRAs with FLUX2_KLEIN_LORAS"),
    ("FLUX2_KLEIN_GUARDRAIL", "", "the guardrail's settings file (docs/GUARDRAIL.md); FLUX2_KLEIN_GUARDRAIL_* variables "
                                 "override it; default: the prompt check with the shipped blocklist"),
    ("FLUX2_KLEIN_REBUILD", "0", "1: rebuild the repository on this start even when the cached one is fresh"),
    ("FLUX2_KLEIN_STOP_TIMEOUT", "30", "seconds the children get to stop after SIGTERM before SIGKILL"),
)
DEFAULTS = {name: default for name, default, _ in ENV_VARS}
ONNX_DIR_TENSORRT = (
    "FLUX2_KLEIN_ONNX_DIR: only the onnxruntime runtime reuses exported graphs; tensorrt exports its own "
    "(bf16 graphs, the FP8 transformer with its calibration) into <cache>/work/<profile key>, kept across "
    "failed builds; unset FLUX2_KLEIN_ONNX_DIR or set FLUX2_KLEIN_RUNTIME=onnxruntime")


def _default_guardrail():
    from ..guardrail.settings import GuardrailSettings

    return GuardrailSettings()


class ConfigError(ValueError):
    """A setting or the environment cannot work; the message says which and what to do."""


@dataclass(frozen=True)
class Settings:
    """The parsed environment (`from_env`); the dataclass defaults are ENV_VARS' defaults."""

    checkpoint: Path = Path(DEFAULTS["FLUX2_KLEIN_CHECKPOINT"])
    cache: Path = Path(DEFAULTS["FLUX2_KLEIN_CACHE"])
    precision: str = DEFAULTS["FLUX2_KLEIN_PRECISION"]
    runtime: str = DEFAULTS["FLUX2_KLEIN_RUNTIME"]
    http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    triton_http_port: int = 8003
    triton_address: str = "127.0.0.1"
    api_key: str = ""
    gateway_args: tuple[str, ...] = ()
    gateway_command: tuple[str, ...] = ()
    triton_command: tuple[str, ...] = ()
    onnx_dir: Path | None = None
    checkpoint_revision: str = ""
    rebuild: bool = False
    stop_timeout: float = 30.0
    loras: tuple = ()  # flux2_klein.lora.LoraSpec
    guardrail: object = field(default_factory=_default_guardrail)  # flux2_klein.guardrail.GuardrailSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get(name, DEFAULTS[name]).strip()

        def choice(name: str, allowed: tuple[str, ...]) -> str:
            value = get(name).lower()
            if value not in allowed:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
            return value

        def port(name: str) -> int:
            value = get(name)
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise ConfigError(f"{name}: {value!r} is not a port number (1..65535)")
            return int(value)

        def words(name: str) -> tuple[str, ...]:
            try:
                return tuple(shlex.split(get(name)))
            except ValueError as e:
                raise ConfigError(f"{name}: cannot split {get(name)!r} into words ({e})") from None

        ports = {name: port(name) for name in ("FLUX2_KLEIN_GATEWAY_PORT", "FLUX2_KLEIN_TRITON_GRPC_PORT",
                                               "FLUX2_KLEIN_TRITON_METRICS_PORT", "FLUX2_KLEIN_TRITON_HTTP_PORT")}
        if len(set(ports.values())) != len(ports):
            raise ConfigError("ports: " + ", ".join(f"{k}={v}" for k, v in ports.items()) + " must all differ")
        try:
            stop_timeout = float(get("FLUX2_KLEIN_STOP_TIMEOUT"))
        except ValueError:
            raise ConfigError(f"FLUX2_KLEIN_STOP_TIMEOUT: {get('FLUX2_KLEIN_STOP_TIMEOUT')!r} is not a number of seconds") from None
        if get("FLUX2_KLEIN_ONNX_DIR") and choice("FLUX2_KLEIN_RUNTIME", RUNTIMES) == "tensorrt":
            raise ConfigError(ONNX_DIR_TENSORRT)
        if get("FLUX2_KLEIN_LORA_LIBRARY"):
            raise ConfigError("FLUX2_KLEIN_LORA_LIBRARY: LoRAs chosen per request run on the torch runtime only "
                              "(flux2_klein/lora_library.py); this container serves tensorrt or onnxruntime, whose "
                              "weights are inside the engines: fuse LoRAs at build time with FLUX2_KLEIN_LORAS "
                              "(FILE[:SCALE],...), or serve `flux2-klein build --runtime torch --lora-library DIR` "
                              "outside it")
        from ..guardrail import load_settings
        from ..lora import LoraError, LoraSpec

        try:
            loras = tuple(LoraSpec.parse(x.strip()) for x in get("FLUX2_KLEIN_LORAS").split(",") if x.strip())
        except LoraError as e:
            raise ConfigError(f"FLUX2_KLEIN_LORAS: {e}") from None
        try:
            guardrail = load_settings(env=env)
        except ValueError as e:  # SettingsError, BlocklistError, ClassifierError: they name the setting
            raise ConfigError(f"guardrail: {e}") from None
        rebuild = get("FLUX2_KLEIN_REBUILD").lower()
        if rebuild not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"FLUX2_KLEIN_REBUILD: {rebuild!r} is not 0 or 1")
        return cls(
            checkpoint=Path(get("FLUX2_KLEIN_CHECKPOINT")),
            cache=Path(get("FLUX2_KLEIN_CACHE")),
            precision=choice("FLUX2_KLEIN_PRECISION", PRECISIONS),
            runtime=choice("FLUX2_KLEIN_RUNTIME", RUNTIMES),
            http_port=ports["FLUX2_KLEIN_GATEWAY_PORT"],
            triton_grpc_port=ports["FLUX2_KLEIN_TRITON_GRPC_PORT"],
            triton_metrics_port=ports["FLUX2_KLEIN_TRITON_METRICS_PORT"],
            triton_http_port=ports["FLUX2_KLEIN_TRITON_HTTP_PORT"],
            triton_address=get("FLUX2_KLEIN_TRITON_ADDRESS") or "127.0.0.1",
            api_key=env.get("FLUX2_KLEIN_API_KEY", ""),
            gateway_args=words("FLUX2_KLEIN_GATEWAY_ARGS"),
            gateway_command=words("FLUX2_KLEIN_GATEWAY_COMMAND"),
            triton_command=words("FLUX2_KLEIN_TRITON_COMMAND"),
            onnx_dir=Path(get("FLUX2_KLEIN_ONNX_DIR")) if get("FLUX2_KLEIN_ONNX_DIR") else None,
            checkpoint_revision=get("FLUX2_KLEIN_CHECKPOINT_REVISION"),
            rebuild=rebuild in ("1", "true", "yes"),
            stop_timeout=max(0.0, stop_timeout),
            loras=loras,
            guardrail=guardrail,
        )

