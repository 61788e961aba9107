"""A leaf network (text_encoder, transformer, vae_decoder, vae_encoder) run by PyTorch.

The module is the export wrapper (`load_wrapper`): the diffusers / transformers network behind the spec's
exact tensors, so this model is a drop-in for the ONNX Runtime or TensorRT one of the same name. Its
weights are read from the checkpoint recorded in the config (nothing is copied into the repository), in
the config's dtype, onto this instance's device: a GPU instance computes on its GPU and takes and gives
GPU tensors by DLPack. Thin glue: the wrapper is the logic.

Config parameters: checkpoint (absolute path), dtype (fp32 | bf16 | fp16), fp8 ("true": FP8 GEMMs, see
flux2_klein/torch_runtime.py), torch_compile ("" or a torch.compile mode), warm_sizes ("", "all" or WxH,...),
max_dit_rows (the batches to warm), intra_op_threads.
"""

import json
import sys

import torch
import triton_python_backend_utils as pb_utils

from flux2_klein.torch_runtime import WarmShapes, load_leaf

OUTPUT_DTYPES = {"TYPE_BF16": torch.bfloat16, "TYPE_FP16": torch.float16}
from flux2_klein.triton_tensors import error_response, get_input, params, to_triton


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        options = params(config)
        self.name = config["name"]
        self.inputs = [t["name"] for t in config["input"]]  # the wrapper's argument order (the spec's)
        self.outputs = [t["name"] for t in config["output"]]
        # The wrappers answer float32 (their export's boundary); a bf16 boundary is declared in the config.
        self.output_dtypes = [OUTPUT_DTYPES.get(t["data_type"]) for t in config["output"]]
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        # Triton caches only responses whose tensors are all in host memory: a cached model (the text
        # encoder) answers from the host, a few milliseconds of copy against a skipped network.
        self.host_outputs = gpu and bool(config.get("response_cache", {}).get("enable", False))
        # One thread per instance: concurrency comes from instances, not from threads fighting.
        torch.set_num_threads(int(options.get("intra_op_threads", "1")))
        if gpu:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # the VAE's convolutions: tuned per shape while warming
        leaf = load_leaf(options["checkpoint"], self.name, dtype=options["dtype"], device=self.device,
                         fp8=options.get("fp8", "false") == "true", compile_mode=options.get("torch_compile", ""),
                         warm_shapes=WarmShapes.parse(options.get("warm_sizes", ""),
                                                      int(options.get("max_dit_rows", "1"))))
        self.module = leaf.module
        # (Not pb_utils.Logger: a Logger call in initialize was seen to leave a model's load hanging.)
        print(f"flux2-klein {leaf.summary}", file=sys.stderr, flush=True)

    def _run(self, request):
        with torch.inference_mode():
            args = [get_input(request, n).to(self.device) for n in self.inputs]
            result = self.module(*args)
            results = result if isinstance(result, tuple) else (result,)
            results = tuple(r if d is None else r.to(d) for r, d in zip(results, self.output_dtypes))
            if self.host_outputs:
                results = tuple(r.cpu() for r in results)
        # to_triton waits for this stream's kernels before a GPU tensor leaves the process.
        return pb_utils.InferenceResponse([to_triton(n, r) for n, r in zip(self.outputs, results)])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._run(request))
            except Exception as e:  # noqa: BLE001 - one bad request must not take the model down
                pb_utils.Logger.log_error(f"{self.name}: {type(e).__name__}: {e}")
                responses.append(error_response(f"{self.name}: {type(e).__name__}: {e}"))
        return responses
