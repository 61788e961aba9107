"""flux2-klein-triton: FLUX.2 [klein] on NVIDIA Triton Inference Server."""

__version__ = "0.1.0"
