"""The TensorRT path, one room (imported as flux2_klein.export.tensorrt):

- library.py  finds TensorRT's Python API (TensorRT, or TensorRT-RTX for CPU builds), the loaded library's
              version, the install check (`python -m flux2_klein.export.tensorrt --check`, __main__.py)
- plan.py     what `build --runtime tensorrt` builds: engine plans from the specs' profiles, the dry run,
              the graphs to export, the repository's tensorrt_plan leaves
- build.py    builds an engine from a plan (strongly typed, timing cache, metadata, staleness, targets)
- inspect.py  what TensorRT made of an engine: FP8 GEMMs, fused attention, device memory

Imports run one way: plan -> build -> library; inspect -> library.
"""
