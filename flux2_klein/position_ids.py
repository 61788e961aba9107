"""The DiT's position ids, int64 [N, 4] of (t, row, col, l), as diffusers' Flux2KleinPipeline builds them.

Bit for bit the pipeline's (v0.42.1: `_prepare_latent_ids`, `_prepare_image_ids`, `_prepare_text_ids`):
the sampler sends them with every DiT call (sampling.py) and the export traces with them
(specs.example_inputs). numpy only, so the specs need no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .sizes import TEXT_TOKENS, latent_grid

# `_prepare_image_ids(scale=10)`: the i-th reference image sits at t = 10 + 10 * i; the noise tokens and
# the text are at t = 0.
REFERENCE_T_SCALE = 10


def grid_ids(rows: int, cols: int, t: int = 0) -> np.ndarray:
    """(t, row, col, 0) for every cell of a rows x cols grid, row-major: torch.cartesian_prod's order."""
    r, c = np.meshgrid(np.arange(rows, dtype=np.int64), np.arange(cols, dtype=np.int64), indexing="ij")
    ids = np.zeros((rows * cols, 4), dtype=np.int64)
    ids[:, 0] = t
    ids[:, 1] = r.ravel()
    ids[:, 2] = c.ravel()
    return ids


def latent_ids(width: int, height: int) -> np.ndarray:
    """Noise-token ids, int64 [h*w, 4]: (0, row, col, 0) (`_prepare_latent_ids`)."""
    return grid_ids(*latent_grid(width, height))


def reference_ids(grids: Sequence[tuple[int, int]]) -> np.ndarray:
    """Reference-token ids, int64 [sum h_i*w_i, 4]: (10 + 10*i, row, col, 0) (`_prepare_image_ids`).

    `grids` are the (rows, cols) token grids of the references in order. Each reference has its own t, so
    the DiT's rotary embedding tells the references apart and from the image being generated (t = 0).
    """
    parts = [grid_ids(r, c, REFERENCE_T_SCALE + REFERENCE_T_SCALE * i) for i, (r, c) in enumerate(grids)]
    return np.concatenate(parts) if parts else np.zeros((0, 4), dtype=np.int64)


def text_ids(length: int = TEXT_TOKENS) -> np.ndarray:
    """Text-token ids, int64 [length, 4]: (0, 0, 0, l) for l in 0..length-1 (`_prepare_text_ids`)."""
    ids = np.zeros((length, 4), dtype=np.int64)
    ids[:, 3] = np.arange(length, dtype=np.int64)
    return ids
