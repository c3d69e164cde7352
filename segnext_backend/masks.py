"""From the decoder's logits to the answered mask, and from a mask to Label Studio's brush RLE.

`mask_to_rle` writes exactly the integers that label-studio-converter's `brush.mask2rle` writes for the
0/255 mask (tests compare the two on the same masks), but works on runs with numpy: the library builds a
Python string bit by bit, which costs seconds on a 12 MP mask, on every click.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .geometry import ModelFrame


@dataclass(frozen=True)
class ObjectMask:
    mask: np.ndarray  # height x width bool, in the frame the clicks came in
    score: float  # mean probability over the mask's pixels (0.0 for an empty mask)

    @property
    def is_empty(self) -> bool:
        return not self.mask.any()


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The probability of each logit, float32: 1 / (1 + e^-x), as torch.sigmoid computes it.

    For x below about -88, e^-x overflows float32 to infinity and the probability is exactly 0, which is the
    right answer: the overflow is expected, so it is not warned about. Three passes, in place.
    """
    out = np.negative(logits, dtype=np.float32)
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += np.float32(1.0)
    return np.reciprocal(out, out=out)


def logits_to_mask(logits: np.ndarray, frame: ModelFrame, threshold: float) -> ObjectMask:
    """1024x1024 logits -> the frame's mask: in where sigmoid(resized logits) > threshold (upstream's `> 0.49`).

    Thresholding the probability at t is thresholding the logit at log(t / (1 - t)), since the sigmoid is
    increasing: so no sigmoid runs over the full-size image. The score is taken in the model frame, where the
    prediction was made, which costs a millionth-pixel sigmoid rather than one per original pixel.
    """
    logit_threshold = np.float32(math.log(threshold / (1.0 - threshold)))
    # Resized and compared a band of rows at a time: the same values as resizing first, without 48 MB of floats.
    mask = frame.logits_to_frame_above(logits, logit_threshold)
    inside = logits > logit_threshold
    score = float(sigmoid(logits[inside]).mean()) if inside.any() and mask.any() else 0.0
    return ObjectMask(mask=mask, score=score)


# Label Studio's brush RLE (label-studio-converter `brush.encode_rle` with wordsize 8 and run-length sizes
# 3, 4, 8, 16) over the RGBA bytes of the mask: each pixel's value (0 or 255) repeated four times.
_HEADER_WORDSIZE_BITS = 5
_RUN_SIZES = (3, 4, 8, 16)
_LONGEST_RUN = 2**16


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths and run values of a 1-D array."""
    ends = np.flatnonzero(values[1:] != values[:-1])
    ends = np.append(ends, values.size - 1)
    lengths = np.diff(ends, prepend=-1)
    return lengths, values[ends]


def _records(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each run as (code, bit width) records, following the converter's encoder case by case."""
    # Runs longer than 2**16 become several 16-bit records: as many full ones as the converter's
    # `while length > 2**16` loop writes (each standing for 2**16 values), then the remainder.
    full_records = np.maximum((lengths - 1) // _LONGEST_RUN, 0)
    remainder = lengths - full_records * _LONGEST_RUN
    repeat = full_records + 1
    run_index = np.repeat(np.arange(lengths.size), repeat)
    is_last = np.ones(run_index.size, dtype=bool)
    is_last[:-1] = run_index[1:] != run_index[:-1]
    record_length = np.where(is_last, remainder[run_index], _LONGEST_RUN).astype(np.int64)
    long_run = (lengths > 256)[run_index]
    value = values[run_index].astype(np.int64)

    # (flag bit, 2-bit size index, length field width) by record length; single values use '0' '00' '000'.
    single = (record_length == 1) & ~long_run
    size_index = np.select(
        [long_run, record_length <= 8, record_length <= 16, record_length <= 256], [3, 0, 1, 2], default=3
    )
    field_width = np.array(_RUN_SIZES)[size_index]
    length_field = np.where(single, 0, record_length - 1)
    flag = np.where(single, 0, 1)
    size_index = np.where(single, 0, size_index)
    code = (((flag << 2 | size_index) << field_width | length_field) << 8) | value
    width = 3 + field_width + 8
    return code, width


def _pack(code: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The big-endian bit strings of the (code, width) records one after the other, zero-padded as the
    converter pads (8 - n % 8 bits), as bytes.

    Records are at most 27 bits wide, so each one, shifted to its bit offset within its first byte, spans at
    most five bytes; records never share a bit, so adding the bytes they touch (one bincount) ORs them.
    """
    width = width.astype(np.int64)
    ends = np.cumsum(width)
    total_bits = int(ends[-1]) if ends.size else 0
    n_bytes = (total_bits + 8 - total_bits % 8) // 8
    starts = ends - width
    first_byte = starts >> 3
    # The record placed in a 40-bit window whose first bit is bit 0 of its first byte.
    window = code.astype(np.int64) << (40 - (starts & 7) - width)
    index = np.concatenate([first_byte + k for k in range(5)])
    values = np.concatenate([(window >> (8 * (4 - k))) & 0xFF for k in range(5)])
    keep = index < n_bytes
    packed = np.bincount(index[keep], weights=values[keep], minlength=n_bytes)
    return packed.astype(np.uint8)


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """A 2-D mask (bool, or uint8 0/255) -> Label Studio brush RLE, identical to `brush.mask2rle(0/255 mask)`."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    flat = mask.ravel()
    on = flat.view(np.uint8) if flat.dtype == np.bool_ else (flat > 0).view(np.uint8)
    lengths, values = _runs(on)
    values = values.astype(np.int64) * 255
    lengths = lengths * 4  # each pixel is four RGBA bytes with the same value
    code, width = _records(lengths.astype(np.int64), values)

    header = (
        [(on.size * 4, 32), (8 - 1, _HEADER_WORDSIZE_BITS)] + [(size - 1, 4) for size in _RUN_SIZES]
    )
    header_code = np.array([c for c, _ in header], dtype=np.int64)
    header_width = np.array([w for _, w in header], dtype=np.int64)
    return _pack(np.concatenate([header_code, code]), np.concatenate([header_width, width])).tolist()
