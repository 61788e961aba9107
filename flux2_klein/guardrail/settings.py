"""What the guardrail does, read from a JSON or TOML file and environment variables, with safe defaults.

Defaults: the prompt check is on with the shipped blocklist; no classifiers; `disable_safety_checker` in a
request is refused (ignored) unless the operator allows it; one audit line per check, without the prompt
or the key. A variable overrides the file's value of the same setting (ENV names them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .classifiers import ClassifierError, ClassifierSettings
from .text import DEFAULT_BLOCKLIST

ENV = {
    "file": "FLUX2_KLEIN_GUARDRAIL",
    "prompt_check": "FLUX2_KLEIN_GUARDRAIL_PROMPT_CHECK",
    "blocklists": "FLUX2_KLEIN_GUARDRAIL_BLOCKLISTS",
    "check_references": "FLUX2_KLEIN_GUARDRAIL_CHECK_REFERENCES",
    "allow_disable_safety_checker": "FLUX2_KLEIN_ALLOW_DISABLE_SAFETY_CHECKER",
    "audit": "FLUX2_KLEIN_GUARDRAIL_AUDIT",
    "audit_prompt": "FLUX2_KLEIN_GUARDRAIL_AUDIT_PROMPT",
    "audit_key": "FLUX2_KLEIN_GUARDRAIL_AUDIT_KEY",
    "text_classifier.path": "FLUX2_KLEIN_GUARDRAIL_TEXT_CLASSIFIER",
    "text_classifier.unsafe_labels": "FLUX2_KLEIN_GUARDRAIL_TEXT_LABELS",
    "text_classifier.threshold": "FLUX2_KLEIN_GUARDRAIL_TEXT_THRESHOLD",
    "text_classifier.device": "FLUX2_KLEIN_GUARDRAIL_TEXT_DEVICE",
    "image_classifier.path": "FLUX2_KLEIN_GUARDRAIL_IMAGE_CLASSIFIER",
    "image_classifier.unsafe_labels": "FLUX2_KLEIN_GUARDRAIL_IMAGE_LABELS",
    "image_classifier.threshold": "FLUX2_KLEIN_GUARDRAIL_IMAGE_THRESHOLD",
    "image_classifier.device": "FLUX2_KLEIN_GUARDRAIL_IMAGE_DEVICE",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SettingsError(ValueError):
    """A guardrail setting that cannot be used; the message names it and what is allowed."""


@dataclass(frozen=True)
class GuardrailSettings:
    """prompt_check: the blocklist (and text classifier) on prompts; blocklists: DEFAULT_BLOCKLIST and/or
    paths; check_references: edit requests' images through the image classifier too; audit_*: what the
    audit line may carry besides hashes."""

    prompt_check: bool = True
    blocklists: tuple[str, ...] = (DEFAULT_BLOCKLIST,)
    text_classifier: ClassifierSettings | None = None
    image_classifier: ClassifierSettings | None = None
    check_references: bool = True
    allow_disable_safety_checker: bool = False
    audit: bool = True
    audit_prompt: bool = False
    audit_key: bool = False

    def __post_init__(self):
        for name in ("prompt_check", "check_references", "allow_disable_safety_checker", "audit", "audit_prompt",
                     "audit_key"):
            if not isinstance(getattr(self, name), bool):
                raise SettingsError(f"{name}: true or false; got {getattr(self, name)!r}")
        if not all(isinstance(b, str) and b for b in self.blocklists):
            raise SettingsError(f"blocklists: a list of paths and/or {DEFAULT_BLOCKLIST!r}; got {self.blocklists!r}")
        for name in ("text_classifier", "image_classifier"):
            value = getattr(self, name)
            if value is not None:
                try:
                    value.check(name)
                except ClassifierError as e:
                    raise SettingsError(str(e)) from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> GuardrailSettings:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError(f"unknown guardrail setting(s) {unknown}; allowed: {sorted(known)}")
        for name in ("text_classifier", "image_classifier"):
            if data.get(name) is not None:
                data[name] = _classifier(name, data[name])
        if "blocklists" in data:
            if isinstance(data["blocklists"], str) or not isinstance(data["blocklists"], (list, tuple)):
                raise SettingsError(f"blocklists: a list of paths and/or {DEFAULT_BLOCKLIST!r}; "
                                    f"got {data['blocklists']!r}")
            data["blocklists"] = tuple(data["blocklists"])
        return cls(**data)


def _classifier(name: str, value) -> ClassifierSettings:
    if not isinstance(value, Mapping):
        raise SettingsError(f"{name}: a table with path, unsafe_labels, threshold (and device); got {value!r}")
    known = {f.name for f in dataclasses.fields(ClassifierSettings)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise SettingsError(f"{name}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    if "path" not in value or "unsafe_labels" not in value:
        raise SettingsError(f"{name}: path and unsafe_labels are required")
    labels = value["unsafe_labels"]
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise SettingsError(f"{name}.unsafe_labels: a list of label names; got {labels!r}")
    threshold = value.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise SettingsError(f"{name}.threshold: a probability in (0, 1]; got {threshold!r}")
    return ClassifierSettings(str(value["path"]), tuple(labels), float(threshold), str(value.get("device", "cpu")))


def read_file(path: str | os.PathLike) -> dict:
    """A settings file's content: TOML for .toml, else JSON."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"guardrail settings file {str(path)!r} not found")
    try:
        if path.suffix.lower() == ".toml":
            with path.open("rb") as f:
                return tomllib.load(f)
        data = json.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"guardrail settings file {path}: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"guardrail settings file {path}: expected an object of settings")
    return data


def _flag(var: str, text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise SettingsError(f"{var}: 1/0, true/false, yes/no or on/off; got {text!r}")


def _env_value(key: str, var: str, text: str):
    name = key.split(".")[-1]
    if name in ("blocklists", "unsafe_labels"):
        return [x.strip() for x in text.split(",") if x.strip()]
    if name == "threshold":
        try:
            return float(text)
        except ValueError:
            raise SettingsError(f"{var}: a probability in (0, 1]; got {text!r}") from None
    if name in ("path", "device"):
        return text
    return _flag(var, text)


def load_settings(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> GuardrailSettings:
    """Settings from `path` (else the file named by FLUX2_KLEIN_GUARDRAIL, else none), then the variables."""
    env = os.environ if env is None else env
    path = path or env.get(ENV["file"]) or None
    data = read_file(path) if path else {}
    for key, var in ENV.items():
        text = env.get(var)
        if key == "file" or text is None or text == "":
            continue
        value = _env_value(key, var, text)
        if "." in key:
            table, name = key.split(".")
            data[table] = {**(data.get(table) or {}), name: value}
        else:
            data[key] = value
    return GuardrailSettings.from_dict(data)
