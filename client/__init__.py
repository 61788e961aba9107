"""Client side of flux2-klein-triton: a tritonclient wrapper for the model `flux2_klein`, image files,
and the `flux2-klein generate` command. tritonclient itself is imported only when first used."""

from .generate import add_generate_parser, parse_size, run_generate
from .images import read_reference, save_image
from .triton_client import Flux2KleinClient, GenerationError, build_inputs, default_url, input_arrays

__all__ = [
    "Flux2KleinClient", "GenerationError", "build_inputs", "input_arrays", "default_url",
    "save_image", "read_reference", "add_generate_parser", "run_generate", "parse_size",
]
