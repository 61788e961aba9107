"""How close an image must be to its oracle: the largest difference, and how much of the picture differs.

The largest difference alone lets through a bug that moves half of all values by 1 (a changed rounding
in post-processing, a dropped epsilon in a normalisation); the mean difference and the share of values
that differ at all catch those. Bounds are per call site, set from measured values with a stated margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageDiff:
    max: int  # largest difference of one channel value
    mean: float  # mean absolute difference over all channel values
    share: float  # fraction of channel values that differ at all

    def __str__(self) -> str:
        return f"max {self.max}, mean {self.mean:.5f}, differing {100 * self.share:.3f}%"


def image_diff(got: np.ndarray, want: np.ndarray) -> ImageDiff:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == np.uint8 and want.dtype == np.uint8, (got.dtype, want.dtype)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    return ImageDiff(int(diff.max()), float(diff.mean()), float(np.count_nonzero(diff)) / diff.size)


def assert_images_close(got: np.ndarray, want: np.ndarray, *, max_diff: int, max_mean: float,
                        max_share: float) -> ImageDiff:
    d = image_diff(got, want)
    print(f"difference against the oracle: {d}")  # shown with -s
    assert d.max <= max_diff, f"largest difference {d.max} > {max_diff} ({d})"
    assert d.mean <= max_mean, f"mean difference {d.mean:.5f} > {max_mean} ({d})"
    assert d.share <= max_share, f"{100 * d.share:.3f}% of values differ, allowed {100 * max_share:.3f}% ({d})"
    return d
