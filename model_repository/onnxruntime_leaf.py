"""A leaf network (text_encoder, transformer, vae_decoder, vae_encoder) served over ONNX Runtime.

The CPU stand-in for the production `tensorrt_plan` model of the same name: same tensors, same
config otherwise. Thin glue: the graph is the logic.
"""

import json
import os

import triton_python_backend_utils as pb_utils

from flux2_klein.ort_session import make_session
from flux2_klein.triton_tensors import error_response, get_numpy, params, to_triton


class TritonPythonModel:
    def initialize(self, args):
        config = params(json.loads(args["model_config"]))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        # The same session as DirectPipeline's (flux2_klein/ort_session.py says why each setting): bounded
        # memory across sizes without page-faulting the working set on every run.
        self.session = make_session(path, threads=int(config.get("intra_op_threads", "1")))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feed = {n: get_numpy(request, n) for n in self.inputs}
                results = self.session.run(self.outputs, feed)
                responses.append(pb_utils.InferenceResponse([to_triton(n, r) for n, r in zip(self.outputs, results)]))
            except Exception as e:  # noqa: BLE001 - one bad request must not take the model down
                responses.append(error_response(f"{type(e).__name__}: {e}"))
        return responses
