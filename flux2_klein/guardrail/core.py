"""The guardrail's decisions on one request: the prompt (blocklist, then the text classifier), the
reference images and the output image (the image classifier), and the audit line that records them.

A `Decision` never holds the prompt: only the stage, the reason, the rule or label that fired, and
its score. `ContentFiltered` carries one to the transport, whose message starts with "content filtered
(<stage>)" (`FILTERED`, `filtered_stage`) so that clients, the gateway included, can tell it from a
caller's mistake.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Sequence

from .classifiers import ImageClassifier, TextClassifier
from .settings import GuardrailSettings
from .text import Blocklist, read_blocklist

STAGES = ("prompt", "reference", "output")
FILTERED = re.compile(r"content filtered \((prompt|reference|output)\)")
_WHAT = {
    "blocklist": "the prompt matches the operator's blocklist",
    "text_classifier": "the prompt was classified unsafe",
    "image_classifier": "the image was classified unsafe",
}


@dataclass(frozen=True)
class Decision:
    """allowed, or filtered at `stage` for `reason` (blocklist | text_classifier | image_classifier), with
    the rule id or label that fired, its score, and for references the index of the image."""

    allowed: bool
    stage: str
    reason: str = ""
    rule: str = ""
    score: float | None = None
    index: int | None = None

    @property
    def filtered(self) -> bool:
        return not self.allowed

    def message(self) -> str:
        """What the caller is told: the stage and the kind of check, not which rule (that helps evasion)."""
        if self.allowed:
            return f"allowed ({self.stage})"
        what = _WHAT.get(self.reason, self.reason)
        if self.stage == "reference":
            what = f"reference_images[{self.index}]: {what}"
        return f"content filtered ({self.stage}): {what}"


def filtered_stage(message: str) -> str | None:
    """The stage named in an error message from a filtered request (as Triton, or the ensemble around
    it, passes it on), or None when the message is about something else."""
    m = FILTERED.search(message or "")
    return m.group(1) if m else None


class ContentFiltered(Exception):
    """A request the guardrail refused; str() is Decision.message()."""

    def __init__(self, decision: Decision):
        super().__init__(decision.message())
        self.decision = decision


def digest(text: str | bytes) -> str:
    """A short stable hash (SHA-256, 16 hex digits) for the audit log: equal inputs, equal hashes. It is
    no secret: a guessed prompt can be confirmed against it."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return hashlib.sha256(data).hexdigest()[:16]


def audit_line(decision: Decision, settings: GuardrailSettings, *, request_id: str = "", prompt: str | None = None,
               key: str | None = None, key_name: str | None = None, source: str = "") -> str:
    """One JSON line: time, source (which component), request id, key name and hash, prompt hash, the
    decision. The prompt and the key themselves only when the operator asked (audit_prompt, audit_key)."""
    line = {"event": "guardrail", "time": round(time.time(), 3), "source": source, "request_id": request_id,
            "decision": "allowed" if decision.allowed else "filtered", "stage": decision.stage}
    line.update({k: v for k, v in asdict(decision).items() if k in ("reason", "rule", "score", "index")
                 and v not in (None, "")})
    if key_name:
        line["key_name"] = key_name
    if key is not None:
        line["key_sha256"] = digest(key)
        if settings.audit_key:
            line["key"] = key
    if prompt is not None:
        line["prompt_sha256"] = digest(prompt)
        if settings.audit_prompt:
            line["prompt"] = prompt
    return json.dumps(line, ensure_ascii=False, sort_keys=False)


@dataclass(frozen=True)
class Verdict:
    """What preprocess does with one request: `decision` (filtered or not), and whether the output image
    still goes through the image check (`check_output`)."""

    decision: Decision
    check_output: bool


class Guardrail:
    """The checks of one Triton model. `stages` says which it runs, so that each model loads only the
    classifiers it needs: preprocess ("prompt", "reference"), the safety model ("output")."""

    def __init__(self, settings: GuardrailSettings, blocklist_sources: Sequence[tuple[str, str]] | None = None,
                 stages: Sequence[str] = STAGES):
        unknown = sorted(set(stages) - set(STAGES))
        if unknown:
            raise ValueError(f"stages: {unknown} not among {list(STAGES)}")
        self.settings = settings
        s = settings
        self.blocklist = None
        if s.prompt_check and "prompt" in stages:
            sources = blocklist_sources if blocklist_sources is not None else [read_blocklist(b) for b in s.blocklists]
            self.blocklist = Blocklist.from_sources(list(sources))
        self.text = TextClassifier(s.text_classifier) if (
            s.prompt_check and s.text_classifier and "prompt" in stages) else None
        wants_images = ("output" in stages) or (s.check_references and "reference" in stages)
        self.image = ImageClassifier(s.image_classifier) if s.image_classifier and wants_images else None
        self.check_references = s.check_references and "reference" in stages

    def bypassed(self, disable_requested: bool) -> bool:
        """A request's disable_safety_checker counts only where the operator allows it, and then skips the
        image checks (references, output): the prompt check is the operator's to switch off (prompt_check),
        never a request's."""
        return bool(disable_requested) and self.settings.allow_disable_safety_checker

    def check_prompt(self, prompt: str) -> Decision:
        if self.blocklist is not None:
            rule = self.blocklist.match(prompt)
            if rule is not None:
                return Decision(False, "prompt", "blocklist", rule)
        if self.text is not None:
            (v,) = self.text.classify([prompt])
            if v.unsafe:
                return Decision(False, "prompt", "text_classifier", v.label, round(v.score, 4))
        return Decision(True, "prompt")

    def check_images(self, images: Sequence, stage: str) -> Decision:
        """The first unsafe image of `images` (uint8 [H, W, 3]), at `stage` ("reference" or "output")."""
        if self.image is not None and len(images):
            for i, v in enumerate(self.image.classify(list(images))):
                if v.unsafe:
                    index = i if stage == "reference" else None
                    return Decision(False, stage, "image_classifier", v.label, round(v.score, 4), index)
        return Decision(True, stage)

    def check_request(self, prompt: str, references: Sequence = (), disable_requested: bool = False) -> Verdict:
        """Preprocess's checks, the prompt first (cheapest, and before any image is looked at)."""
        decision = self.check_prompt(prompt)
        if self.bypassed(disable_requested):
            return Verdict(decision, check_output=False)
        if decision.allowed and self.check_references and len(references):
            decision = self.check_images(references, "reference")
        return Verdict(decision, check_output=True)
