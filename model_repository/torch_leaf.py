"""A leaf network (text_encoder, transformer, vae_decoder, vae_encoder) run by PyTorch.

The module is the network's wrapper (flux2_klein/networks.py): the diffusers / transformers network behind
the spec's exact tensors, so this model is a drop-in for the ONNX Runtime or TensorRT one of the same name. Its
weights are read from the checkpoint recorded in the config (nothing is copied into the repository), in
the config's dtype, onto this instance's device: a GPU instance computes on its GPU and takes and gives
GPU tensors by DLPack. Thin glue: the wrapper is the logic.

Config parameters: checkpoint (absolute path), dtype (fp32 | bf16 | fp16), fp8 ("true": FP8 GEMMs, see
flux2_klein/torch_runtime.py), torch_compile ("" or a torch.compile mode), warm_sizes ("", "all" or WxH,...),
max_dit_rows (the batches to warm), warm_references (the reference counts to warm, 0..4), intra_op_threads,
lora_library (the DiT's per-request LoRAs, flux2_klein/lora_library.py: then an optional input `loras`).

Warm-up uses the input dtypes this config declares (what Triton lets through). Every network call is timed
and its compiles counted (flux2_klein/leaf_timing.py), exported as Triton custom metrics; a request that
compiles is logged as an error.
"""

import json
import sys

import torch
import triton_python_backend_utils as pb_utils

from flux2_klein.dtypes import CONFIG_DTYPES, torch_dtype
from flux2_klein.leaf_timing import TritonMetrics
from flux2_klein.lora_library import LIBRARY_PARAMETER, Library, choice_of_tensor
from flux2_klein.torch_runtime import WarmShapes, configure_torch, load_leaf
from flux2_klein.triton_tensors import error_response, get_input, get_numpy, params, to_triton


def _output_dtype(config_type: str):
    """What a wrapper's answer is cast to before it leaves: the narrower float the config declares (bf16 at the
    bf16 boundary, fp16), else nothing (the wrappers answer float32, uint8 images, as their export does)."""
    name = CONFIG_DTYPES[config_type]
    dtype = None if name == "bytes" else torch_dtype(name)
    return dtype if dtype is not None and dtype.is_floating_point and dtype.itemsize < 4 else None


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        options = params(config)
        self.name = config["name"]
        # The wrapper's argument order (the spec's); a DiT with a LoRA library also takes `loras`, optional.
        self.inputs = [t["name"] for t in config["input"] if not t.get("optional", False)]
        library = options.get(LIBRARY_PARAMETER)
        self.outputs = [t["name"] for t in config["output"]]
        # The wrappers answer float32 (their export's boundary); a bf16 boundary is declared in the config.
        self.output_dtypes = [_output_dtype(t["data_type"]) for t in config["output"]]
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        # Triton caches only responses whose tensors are all in host memory: a cached model (the text
        # encoder) answers from the host, a few milliseconds of copy against a skipped network.
        self.host_outputs = gpu and bool(config.get("response_cache", {}).get("enable", False))
        # One thread per instance: concurrency comes from instances, not from threads fighting.
        torch.set_num_threads(int(options.get("intra_op_threads", "1")))
        if gpu:
            torch.cuda.set_device(self.device)
        settings = configure_torch(options["dtype"])  # inductor and cuDNN: the bench's baseline sets the same
        leaf = load_leaf(options["checkpoint"], self.name, dtype=options["dtype"], device=self.device,
                         fp8=options.get("fp8", "false") == "true", compile_mode=options.get("torch_compile", ""),
                         warm_shapes=WarmShapes.parse(options.get("warm_sizes", ""),
                                                      int(options.get("max_dit_rows", "1")),
                                                      int(options.get("warm_references", "4"))),
                         input_dtypes={t["name"]: CONFIG_DTYPES[t["data_type"]] for t in config["input"]
                                       if t["name"] in self.inputs},
                         lora_library=Library.from_json(library) if library else None)
        self.leaf = leaf
        self.metrics = TritonMetrics(pb_utils, self.name, args.get("model_instance_name", self.name))
        leaf.monitor.sink = self.metrics.record
        # (Not pb_utils.Logger: a Logger call in initialize was seen to leave a model's load hanging.)
        print(f"flux2-klein {leaf.summary}; compile threads {settings['compile_threads']}, cuDNN benchmark "
              f"{settings['cudnn_benchmark']}", file=sys.stderr, flush=True)

    def _run(self, request):
        with torch.inference_mode():
            args = [get_input(request, n).to(self.device) for n in self.inputs]
            if self.leaf.adapters is not None:  # the set this call runs with (the sampler batches one set)
                loras = get_numpy(request, "loras")
                self.leaf.adapters.activate(() if loras is None else choice_of_tensor(loras, self.leaf.adapters.names))
            result = self.leaf(*args)
            if self.leaf.monitor.last_compiled:
                pb_utils.Logger.log_error(
                    f"{self.name}: this request compiled {self.leaf.monitor.last_compiled} graph(s) after warm-up "
                    f"({self.leaf.monitor.compiles} so far): warm-up missed its dtypes or shapes "
                    f"{[(tuple(a.shape), str(a.dtype)) for a in args]}")
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

    def finalize(self):
        m = self.leaf.monitor
        print(f"flux2-klein {self.name}: served {m.calls} network calls, {m.seconds:.1f} s in the network, "
              f"{m.compiles} graphs compiled after warm-up", file=sys.stderr, flush=True)
        self.metrics.close()
