"""Triton model `safety`: the output image through the guardrail's image classifier (flux2_klein.guardrail),
answered unchanged, or refused with "content filtered (output): ..." (INVALID_ARGUMENT)."""

import triton_python_backend_utils as pb_utils

from flux2_klein.guardrail import ContentFiltered
from flux2_klein.guardrail.triton import TritonGuardrail, filtered_response
from flux2_klein.triton_tensors import error_response, get_input, get_numpy, to_triton


class TritonPythonModel:
    def initialize(self, args):
        self.guard = TritonGuardrail(args, stages=("output",))

    def _respond(self, request):
        image = get_input(request, "image")
        check = get_numpy(request, "check_output")
        if check is None or bool(check.reshape(-1)[0]):
            self.guard.check_output(request, image)
        # A copy: the input's buffer is Triton's, released when this request ends.
        return pb_utils.InferenceResponse([to_triton("image", image.clone())])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._respond(request))
            except ContentFiltered as e:
                responses.append(filtered_response(e))
            except Exception as e:  # noqa: BLE001 - answer, log, keep serving
                pb_utils.Logger.log_error(f"safety: {type(e).__name__}: {e}")
                responses.append(error_response(f"safety check failed: {type(e).__name__}: {e}"))
        return responses
