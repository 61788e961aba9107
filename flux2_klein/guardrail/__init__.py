"""The guardrail: a prompt blocklist and optional Hugging Face classifiers of prompts and images, run inside
the served pipeline (preprocess, and the `safety` model after the VAE), with an audit line per check.

Transport-free here (core, text, classifiers, settings, repository); `triton` is the Python-backend side.
"""

from .classifiers import ClassifierError, ClassifierSettings, ImageClassifier, TextClassifier
from .core import (
    FILTERED, STAGES, ContentFiltered, Decision, Guardrail, Verdict, audit_line, digest, filtered_stage,
)
from .settings import ENV, GuardrailSettings, SettingsError, load_settings
from .text import DEFAULT_BLOCKLIST, Blocklist, BlocklistError, normalize, parse_blocklist, read_blocklist

__all__ = [
    "Blocklist", "BlocklistError", "ClassifierError", "ClassifierSettings", "ContentFiltered", "DEFAULT_BLOCKLIST",
    "Decision", "ENV", "FILTERED", "Guardrail", "GuardrailSettings", "ImageClassifier", "STAGES", "SettingsError",
    "TextClassifier", "Verdict", "audit_line", "digest", "filtered_stage", "load_settings", "normalize",
    "parse_blocklist", "read_blocklist",
]
