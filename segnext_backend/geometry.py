"""Every mapping between an image's own frame and SegNext's 1024x1024 model frame, and nothing else.

Upstream SegNext stretches the whole image to 1024x1024 (no padding, aspect ratio not kept), so x and y
scale independently:
- image -> model input: bilinear with half-pixel centres and no antialiasing, the same as torch's
  `F.interpolate(mode="bilinear", align_corners=False)` (Pillow's BILINEAR antialiases when shrinking and
  would feed the encoder a different image);
- click (x, y) in original pixels -> (round(x * 1024 / W), round(y * 1024 / H)) in the model frame;
- logits 1024x1024 -> the original size: bilinear with `align_corners=True`, as upstream's predictor does.

The resize is our own separable numpy implementation: it touches only the two source rows and columns each
output pixel needs, so shrinking a 24 MP photo never converts the whole photo to float. Its tests compare it
with torch and with an independent reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODEL_SIZE = 1024


def _source_taps(in_size: int, out_size: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: the two source indices to blend and the weight of the second one."""
    out_index = np.arange(out_size, dtype=np.float64)
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        source = out_index * scale
    else:
        # Half-pixel centres; torch clamps negative source positions to 0 (and so does OpenCV).
        source = np.maximum((out_index + 0.5) * (in_size / out_size) - 0.5, 0.0)
    first = np.minimum(np.floor(source).astype(np.intp), in_size - 1)
    second = np.minimum(first + 1, in_size - 1)
    weight = (source - first).astype(np.float32)
    return first, second, weight


def _resize_axis(array: np.ndarray, out_size: int, axis: int, align_corners: bool) -> np.ndarray:
    first, second, weight = _source_taps(array.shape[axis], out_size, align_corners)
    shape = [1] * array.ndim
    shape[axis] = out_size
    return _blend(np.take(array, first, axis=axis), np.take(array, second, axis=axis), weight.reshape(shape))


def _blend(a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """a + weight * (b - a) in float32: one multiply, and exact where the weight is 0. Reuses a's buffer."""
    a = a.astype(np.float32, copy=False)
    b = b.astype(np.float32, copy=False)
    b -= a
    b *= weight
    a += b
    return a


def bilinear_resize(array: np.ndarray, out_height: int, out_width: int, *, align_corners: bool) -> np.ndarray:
    """Bilinear resize of an HxW or HxWxC array (any real dtype) to float32, without antialiasing.

    Rows and columns are resized one after the other; the axis that shrinks most goes first, so that the
    second pass works on the smaller intermediate.
    """
    height, width = array.shape[:2]
    rows_first = out_height / height <= out_width / width
    if rows_first:
        return _resize_axis(_resize_axis(array, out_height, 0, align_corners), out_width, 1, align_corners)
    return _resize_axis(_resize_axis(array, out_width, 1, align_corners), out_height, 0, align_corners)


def bilinear_resize_at_least(
    array: np.ndarray, out_height: int, out_width: int, threshold: float, *, align_corners: bool, block_rows: int = 64
) -> np.ndarray:
    """`bilinear_resize(array, ...) >= threshold` for a 2-D array, bit for bit, without the full-size floats.

    The same passes in the same order with the same float32 arithmetic as `bilinear_resize` (so the same
    values reach the comparison), but the output is made a band of rows at a time and compared at once:
    a 12 MP mask never exists as 48 MB of float32, and each band stays in the CPU cache.
    """
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {array.shape}")
    height, width = array.shape
    out = np.empty((out_height, out_width), dtype=bool)
    threshold = np.float32(threshold)
    rows_first = out_height / height <= out_width / width
    first, second, weight = _source_taps(height, out_height, align_corners)
    if rows_first:
        # Rows pass then columns pass, per band of output rows (each row's values depend on its own taps only).
        source = array
    else:
        # Columns pass on the whole (small) source first, then the rows pass per band.
        source = _resize_axis(array, out_width, 1, align_corners)
    # Bilinear weights are in [0, 1], so each output value lies between the smallest and the largest source
    # value it blends (up to a few float32 roundings, far inside `margin`): a band whose source rows are all
    # clearly below (above) the threshold is all False (True) without resizing it. A real mask is mostly
    # such bands.
    finite = np.isfinite(source).all()
    row_min, row_max = source.min(axis=1), source.max(axis=1)
    margin = np.float32(1e-4) * (np.float32(np.abs(source).max(initial=0.0)) + abs(threshold)) if finite else None
    for start in range(0, out_height, block_rows):
        stop = min(start + block_rows, out_height)
        if margin is not None:
            low, high = int(first[start]), int(second[stop - 1])  # taps grow with the output index
            if row_max[low : high + 1].max() < threshold - margin:
                out[start:stop] = False
                continue
            if row_min[low : high + 1].min() > threshold + margin:
                out[start:stop] = True
                continue
        # Fancy indexing copies, so blending in place never touches `source`.
        a = _blend(source[first[start:stop]], source[second[start:stop]], weight[start:stop, None])
        if rows_first:
            a = _resize_axis(a, out_width, 1, align_corners)
        np.greater_equal(a, threshold, out=out[start:stop])
    return out


def to_model_input(rgb: np.ndarray) -> np.ndarray:
    """An HxWx3 uint8 RGB image -> the encoder's 1x3x1024x1024 float32 input, RGB in [0, 1]."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {rgb.shape}")
    # Resizing is linear, so dividing by 255 after the resize gives what upstream gets by dividing first.
    resized = bilinear_resize(rgb, MODEL_SIZE, MODEL_SIZE, align_corners=False)
    resized *= np.float32(1.0 / 255.0)
    return np.ascontiguousarray(resized.transpose(2, 0, 1))[None]


def _require_model_frame(logits: np.ndarray) -> None:
    if logits.shape != (MODEL_SIZE, MODEL_SIZE):
        raise ValueError(f"expected 1024x1024 logits, got {logits.shape}")


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
        """Nx2 (x, y) in frame pixels -> Nx2 float32 whole pixels in the model frame.

        A click on the far edge (x == width) would land on 1024, one past the last model pixel: it is kept
        on the last pixel instead.
        """
        points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        scale = np.array([MODEL_SIZE / self.width, MODEL_SIZE / self.height])
        model_points = np.rint(points * scale)
        return np.clip(model_points, 0, MODEL_SIZE - 1).astype(np.float32)

    def logits_to_frame(self, logits: np.ndarray) -> np.ndarray:
        """1024x1024 logits -> height x width logits (float32)."""
        _require_model_frame(logits)
        if (self.height, self.width) == logits.shape:
            return logits.astype(np.float32, copy=False)
        return bilinear_resize(logits, self.height, self.width, align_corners=True)

    def logits_to_frame_at_least(self, logits: np.ndarray, logit_threshold: float) -> np.ndarray:
        """`logits_to_frame(logits) >= logit_threshold` (height x width bool), without full-size floats."""
        _require_model_frame(logits)
        if (self.height, self.width) == logits.shape:
            return logits.astype(np.float32, copy=False) >= np.float32(logit_threshold)
        return bilinear_resize_at_least(logits, self.height, self.width, logit_threshold, align_corners=True)
