"""Every mapping between an image's own frame and SegNext's 1024x1024 model frame, and nothing else.

Upstream SegNext's predictor (docs/segnext.md) stretches the whole image to 1024x1024 (no padding, aspect ratio
not kept), so x and y scale independently, and every resize between the two frames is torch's
`F.interpolate(mode="bilinear", align_corners=False)`: half-pixel centres, no antialiasing.
- image -> model input: that resize (Pillow's BILINEAR antialiases when shrinking and would feed the encoder
  a different image);
- click -> model frame: the pixel under the click, (column, row), each index v mapped to
  `int(v * 1024 / size + 0.5)` computed in float32 as upstream does: halves round up and nothing is clipped,
  so the last pixel of an image of 2048 px or more lands on 1024;
- logits 1024x1024 -> the frame's size: that resize (corners are aligned only inside the model, 256 -> 1024);
- the next click's `prev_mask`: the probability at the frame's size, resized back to 1024x1024 by that resize.

The resize is our own separable numpy implementation: it touches only the two source rows and columns each
output pixel needs, so shrinking a 24 MP photo never converts the whole photo to float, and the `prev_mask`
round trip never builds the frame-size map. Its tests compare it with torch and with an independent reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

MODEL_SIZE = 1024


def _source_taps(
    in_size: int, out_size: int, indices: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index (`indices`, or all `out_size` of them): the two source indices to blend and the
    weight of the second one.

    The source position is computed as torch's CPU kernel computes it, so that the weights are torch's
    (bit for bit on the CPUs this was tested on): in float32, `scale * (i + 0.5) - 0.5` with scale = in / out,
    the multiply and the subtraction fused (one rounding); half-pixel centres, negative positions clamped to 0.
    Each index's taps depend on that index alone, so the taps of a part of the output are those of the whole.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    if indices is None:
        indices = np.arange(out_size)
    centres = indices.astype(np.float32) + np.float32(0.5)
    # A float32 product is exact in float64, so rounding (product - 0.5) once to float32 is the fused result.
    source = np.maximum((np.float64(scale) * centres - 0.5).astype(np.float32), np.float32(0.0))
    first = np.minimum(source.astype(np.intp), in_size - 1)  # truncation: the positions are >= 0
    second = np.minimum(first + 1, in_size - 1)
    weight = source - first.astype(np.float32)
    return first, second, weight


def _blend_axis(array: np.ndarray, taps: tuple, axis: int) -> np.ndarray:
    """Blend the two source indices of each output index along `axis`. np.take, not fancy indexing: along
    columns it is an order of magnitude faster."""
    first, second, weight = taps
    shape = [1] * array.ndim
    shape[axis] = len(weight)
    return _blend(np.take(array, first, axis=axis), np.take(array, second, axis=axis), weight.reshape(shape))


def _resize_axis(array: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    return _blend_axis(array, _source_taps(array.shape[axis], out_size), axis)


def _blend(a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """a + weight * (b - a) in float32: one multiply, and exact where the weight is 0. Reuses a's buffer."""
    a = a.astype(np.float32, copy=False)
    b = b.astype(np.float32, copy=False)
    b -= a
    b *= weight
    a += b
    return a


def bilinear_resize(array: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres, no antialiasing) of an HxW or HxWxC array (any real dtype) to
    float32: torch's `F.interpolate(mode="bilinear", align_corners=False)`.

    Rows and columns are resized one after the other; the axis that shrinks most goes first, so that the
    second pass works on the smaller intermediate.
    """
    height, width = array.shape[:2]
    rows_first = out_height / height <= out_width / width
    if rows_first:
        return _resize_axis(_resize_axis(array, out_height, 0), out_width, 1)
    return _resize_axis(_resize_axis(array, out_width, 1), out_height, 0)


# Output pixels resized at once by `bilinear_resize_above` (about a megabyte of float32): a frame of any shape
# is made in pieces of this size, so its memory and time per pixel do not depend on its aspect ratio.
TILE_PIXELS = 1 << 18


def bilinear_resize_above(
    array: np.ndarray, out_height: int, out_width: int, threshold: float, *, tile_pixels: int = TILE_PIXELS
) -> np.ndarray:
    """`bilinear_resize(array, ...) > threshold` for a 2-D array, bit for bit, without the full-size floats.

    The same passes in the same order with the same float32 arithmetic as `bilinear_resize` (so the same
    values reach the comparison), but the output is made a tile at a time (a band of rows, or a part of one
    row) and compared at once: a 12 MP mask never exists as 48 MB of float32, each tile stays in the CPU
    cache, and the taps are computed for a tile's own rows and columns. So a 1 x 100,000,000 frame costs what
    a 10,000 x 10,000 one does: neither whole-side taps (24 bytes per index) nor a Python loop per few rows.
    """
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {array.shape}")
    height, width = array.shape
    out = np.empty((out_height, out_width), dtype=bool)
    threshold = np.float32(threshold)
    # Rows pass then columns pass when rows shrink most, else columns then rows; either way per band of output
    # rows (each row's values depend on its own taps only), and the second pass a tile of columns at a time.
    rows_first = out_height / height <= out_width / width
    tile_columns = min(out_width, tile_pixels)
    # A band holds `band_rows` rows of the first pass (`width` or out_width wide) and of the output (made
    # `tile_columns` at a time).
    band_rows = max(1, tile_pixels // max(width if rows_first else out_width, tile_columns))
    # Columns first: out_width < out_height, so these taps are no larger than one output column's.
    column_taps = _source_taps(width, out_width) if tile_columns == out_width or not rows_first else None
    # Bilinear weights are in [0, 1], so each output value lies between the smallest and the largest source
    # value it blends (up to a few float32 roundings, far inside `margin`): a band whose source rows are all
    # clearly below (above) the threshold is all False (True) without resizing it. A real mask is mostly
    # such bands.
    finite = np.isfinite(array).all()
    row_min, row_max = array.min(axis=1), array.max(axis=1)
    margin = np.float32(1e-4) * (np.float32(np.abs(array).max(initial=0.0)) + abs(threshold)) if finite else None
    for start in range(0, out_height, band_rows):
        stop = min(start + band_rows, out_height)
        first, second, weight = _source_taps(height, out_height, np.arange(start, stop))
        low, high = int(first[0]), int(second[-1])  # taps grow with the output index
        if margin is not None:
            if row_max[low : high + 1].max() < threshold - margin:
                out[start:stop] = False
                continue
            if row_min[low : high + 1].min() > threshold + margin:
                out[start:stop] = True
                continue
        weight = weight[:, None]
        if rows_first:
            # Fancy indexing copies, so blending in place never touches `array`.
            band = _blend(array[first], array[second], weight)
        else:
            band = _blend_axis(array[low : high + 1], column_taps, 1)  # the columns pass on the rows read here
            first, second = first - low, second - low
        for left in range(0, out_width, tile_columns):
            right = min(left + tile_columns, out_width)
            if rows_first:
                values = _blend_axis(band, column_taps or _source_taps(width, out_width, np.arange(left, right)), 1)
            else:
                values = _blend(band[first, left:right], band[second, left:right], weight)
            np.greater(values, threshold, out=out[start:stop, left:right])
    return out


def to_model_input(rgb: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 RGB image -> the encoder's 1x3x1024x1024 float32 input, RGB in [0, 1]."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {rgb.shape}")
    # Resizing is linear, so dividing by 255 after the resize gives what upstream gets by dividing first.
    resized = bilinear_resize(rgb, MODEL_SIZE, MODEL_SIZE)
    resized *= np.float32(1.0 / 255.0)
    return np.ascontiguousarray(resized.transpose(2, 0, 1))[None]


def _require_model_frame(values: np.ndarray) -> None:
    if values.shape != (MODEL_SIZE, MODEL_SIZE):
        raise ValueError(f"expected a 1024x1024 map, got {values.shape}")


def _frame_and_back_taps(frame_size: int) -> tuple:
    """Along one axis of a frame of `frame_size` pixels, for the resize to the frame and back to 1024:

    - `needed`: the frame indices the way back reads (at most 2 x 1024 of them, sorted);
    - `to_frame`: (first, second, weight) of those frame indices, in the model frame;
    - `back`: (first, second, weight) of the 1024 model indices, as positions in `needed`.
    """
    back_first, back_second, back_weight = _source_taps(frame_size, MODEL_SIZE)
    needed = np.union1d(back_first, back_second)
    # Only the needed indices' taps: a side of 100,000,000 pixels must not cost its 2.4 GB of taps.
    to_frame = _source_taps(MODEL_SIZE, frame_size, needed)
    back = (np.searchsorted(needed, back_first), np.searchsorted(needed, back_second), back_weight)
    return to_frame, back


@dataclass(frozen=True)
class ModelFrame:
    """The mapping between one image frame (width x height pixels) and the 1024x1024 model frame.

    The frame is the one the clicks and the answered mask live in: Label Studio's `original_width` x
    `original_height`. Because the model sees a stretched image, this mapping holds whatever the size of the
    pixels that were actually encoded.
    """

    width: int
    height: int

    def __post_init__(self):
        if self.width < 1 or self.height < 1:
            raise ValueError(f"frame size must be positive, got {self.width}x{self.height}")

    def clicks_to_model_frame(self, points: np.ndarray) -> np.ndarray:
        """Nx2 (x, y) continuous positions in the frame -> Nx2 float32 whole pixels in the model frame.

        A position falls in the pixel `floor(v)`; the far edge (v == size) is the last pixel. Upstream's
        clicks are pixel indices, mapped with `int(v * (1024 / size) + 0.5)` where torch multiplies in
        float32 (the index and the scale rounded to float32 first) and adds 0.5 in float32: so here too.
        Nothing is clipped: on an image of 2048 px or more the last pixel lands on 1024, one past the last
        model pixel, and the decoder draws the part of its disk that falls inside.
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        last_pixel = np.array([self.width - 1, self.height - 1], dtype=np.float64)
        pixels = np.clip(np.floor(points), 0, last_pixel).astype(np.float32)
        scale = np.array([MODEL_SIZE / self.width, MODEL_SIZE / self.height], dtype=np.float32)
        # float32 * float32, then + 0.5 in float32: each step rounded as torch rounds it. int() truncates,
        # which is floor for these non-negative values.
        return np.floor(pixels * scale + np.float32(0.5))

    def logits_to_frame(self, logits: np.ndarray) -> np.ndarray:
        """1024x1024 logits -> height x width logits (float32)."""
        _require_model_frame(logits)
        if (self.height, self.width) == logits.shape:
            return logits.astype(np.float32, copy=False)
        return bilinear_resize(logits, self.height, self.width)

    def logits_to_frame_above(self, logits: np.ndarray, logit_threshold: float) -> np.ndarray:
        """`logits_to_frame(logits) > logit_threshold` (height x width bool), without full-size floats."""
        _require_model_frame(logits)
        if (self.height, self.width) == logits.shape:
            return logits.astype(np.float32, copy=False) > np.float32(logit_threshold)
        return bilinear_resize_above(logits, self.height, self.width, logit_threshold)

    def through_frame(self, values: np.ndarray, pointwise: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """A 1024x1024 map resized to the frame, `pointwise` applied there, and resized back to 1024x1024.

        This is upstream's `prev_mask` (with `pointwise` the sigmoid): the probability kept at the image's
        size, resized back for the next click. The frame-size map is never built: each of the 1024 rows of
        the way back reads two rows of it, and each of those is a blend of two rows of `values`; the same
        holds for columns. So at most 2048 x 2048 frame values are computed, whatever the frame's size, each
        the float32 blend (rows, then columns) that resizing the whole map in that order would compute.
        """
        _require_model_frame(values)
        row_to_frame, row_back = _frame_and_back_taps(self.height)
        column_to_frame, column_back = _frame_and_back_taps(self.width)
        frame_values = _blend_axis(_blend_axis(values, row_to_frame, 0), column_to_frame, 1)
        frame_values = np.asarray(pointwise(frame_values), dtype=np.float32)
        return _blend_axis(_blend_axis(frame_values, row_back, 0), column_back, 1)
