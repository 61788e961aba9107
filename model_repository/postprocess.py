"""Triton model `postprocess`: the decoded image pasted back into the picture for a padding_mask_crop request
(flux2_klein.mask_crop), else answered as it is."""

import numpy as np
import triton_python_backend_utils as pb_utils

from flux2_klein.mask_crop import paste_back
from flux2_klein.triton_tensors import error_response, get_numpy, to_triton


class TritonPythonModel:
    def _respond(self, request):
        image = get_numpy(request, "image")
        kept = get_numpy(request, "overlay")
        if kept.size:
            image = paste_back(image, kept, tuple(get_numpy(request, "crop_box").reshape(4)))
        else:
            image = np.array(image, copy=True)  # the input's buffer is Triton's, released when this request ends
        return pb_utils.InferenceResponse([to_triton("image", image)])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._respond(request))
            except Exception as e:  # noqa: BLE001 - answer, log, keep serving
                pb_utils.Logger.log_error(f"postprocess: {type(e).__name__}: {e}")
                responses.append(error_response(f"postprocess failed: {type(e).__name__}: {e}"))
        return responses
