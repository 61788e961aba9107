"""A leaf network (text_encoder, transformer, vae_decoder, vae_encoder) served over ONNX Runtime.

The CPU stand-in for the production `tensorrt_plan` model of the same name: same tensors, same
config otherwise. Thin glue: the graph is the logic.
"""

import json
import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from flux2_klein.triton_tensors import error_response, get_numpy, params, to_triton


class TritonPythonModel:
    def initialize(self, args):
        config = params(json.loads(args["model_config"]))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        opts = ort.SessionOptions()
        # One thread per instance: concurrency comes from instances, not from threads fighting.
        opts.intra_op_num_threads = int(config.get("intra_op_threads", "1"))
        opts.inter_op_num_threads = 1
        # Shapes change with every size: ORT's arena and memory patterns would keep the largest of each
        # (gigabytes per VAE instance at 1568x672); plain allocations keep an instance near its need.
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
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
