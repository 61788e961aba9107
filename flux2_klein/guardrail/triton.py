"""The guardrail inside Triton's Python backend: checks with an audit line each, a counter of filtered
requests by stage (Triton's custom metrics, on its metrics port), the error answer.

Only importable inside a Triton Python-backend stub (it needs triton_python_backend_utils).
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ..triton_tensors import error_response
from .core import STAGES, ContentFiltered, Decision, Guardrail, audit_line
from .repository import load

METRIC = "flux2_klein_guardrail_filtered_total"


class TritonGuardrail:
    """One model's guardrail: `stages` as in Guardrail; its settings come from the repository."""

    def __init__(self, args: dict, stages, intra_op_threads: int = 1):
        import torch

        # Each model instance is a process of its own and several share the cores: one thread per classifier
        # call, as the leaves run (with two threads on a busy 2-core machine a tiny BERT took 160 ms, not 1).
        torch.set_num_threads(intra_op_threads)
        settings, sources = load(args["model_repository"])
        self.guard = Guardrail(settings, sources, stages)
        self.settings = settings
        self.source = args["model_name"]
        # Every instance of every model registers the same family; Triton hands back the one it has.
        self._family = pb_utils.MetricFamily(name=METRIC, description="requests refused by the guardrail, by stage",
                                             kind=pb_utils.MetricFamily.COUNTER)
        self._counters = {s: self._family.Metric(labels={"stage": s}) for s in STAGES}

    def _record(self, request, decision: Decision, prompt: str | None) -> None:
        if decision.filtered:
            self._counters[decision.stage].increment(1)
        if self.settings.audit:
            pb_utils.Logger.log_info(audit_line(decision, self.settings, request_id=request.request_id(),
                                                prompt=prompt, source=self.source))
        if decision.filtered:
            raise ContentFiltered(decision)

    def check_request(self, request, prompt: str, references, disable_requested: bool) -> bool:
        """Preprocess: the prompt and the references; raises ContentFiltered; whether to check the output."""
        verdict = self.guard.check_request(prompt, references, disable_requested)
        self._record(request, verdict.decision, prompt)
        return verdict.check_output

    def check_output(self, request, image) -> None:
        """The safety model: the decoded image; raises ContentFiltered."""
        self._record(request, self.guard.check_images([image], "output"), None)


def filtered_response(e: ContentFiltered) -> "pb_utils.InferenceResponse":
    """INVALID_ARGUMENT over gRPC, 400 over HTTP, the message starting "content filtered (<stage>)"."""
    return error_response(str(e), invalid_argument=True)
