"""From the decoder's logits to the answered mask, and from a mask to Label Studio's brush RLE.

`mask_to_rle` writes exactly the integers that label-studio-converter's `brush.mask2rle` writes for the
0/255 mask (tests compare the two on the same masks), but works on runs with numpy: the library builds a
Python string bit by bit, which costs seconds on a 12 MP mask, on every click.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import AnswerTooLargeError
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


# Pixels of a mask scanned at once for its runs, and runs made into records at once: the RLE of any mask
# is built with temporaries of a few megabytes, its own size aside.
_SCAN_PIXELS = 1 << 22
_RUNS_PER_CHUNK = 1 << 16


def _run_count(on: np.ndarray) -> int:
    """How many runs a 1-D uint8 array of 0/1 has, without a temporary of its size."""
    changes = 0
    for start in range(0, on.size - 1, _SCAN_PIXELS):
        part = on[start : start + _SCAN_PIXELS + 1]
        changes += int(np.count_nonzero(part[1:] != part[:-1]))
    return changes + 1


def _run_ends(on: np.ndarray) -> np.ndarray:
    """The index of the last value of each run of a 1-D array (int64), found a part of the array at a time."""
    ends = []
    for start in range(0, on.size - 1, _SCAN_PIXELS):
        part = on[start : start + _SCAN_PIXELS + 1]
        ends.append(np.flatnonzero(part[1:] != part[:-1]) + start)
    ends.append(np.array([on.size - 1]))
    return np.concatenate(ends).astype(np.int64)


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


def _pack_into(out: np.ndarray, code: np.ndarray, width: np.ndarray, start_bit: int) -> int:
    """OR the big-endian bit strings of the (code, width) records, one after the other from `start_bit`, into
    the bytes `out`; returns the bit after the last record.

    Records are at most 27 bits wide, so each one, shifted to its bit offset within its first byte, spans at
    most five bytes; records never share a bit, so adding the bytes they touch (one bincount) ORs them, and
    OR-ing into `out` joins them to the records packed before.
    """
    width = width.astype(np.int64)
    ends = start_bit + np.cumsum(width)
    starts = ends - width
    first_byte = starts >> 3
    # The record placed in a 40-bit window whose first bit is bit 0 of its first byte.
    window = code.astype(np.int64) << (40 - (starts & 7) - width)
    index = np.concatenate([first_byte + k for k in range(5)])
    values = np.concatenate([(window >> (8 * (4 - k))) & 0xFF for k in range(5)])
    keep = index < out.size
    low = int(first_byte[0])
    packed = np.bincount(index[keep] - low, weights=values[keep])
    out[low : low + packed.size] |= packed.astype(np.uint8)
    return int(ends[-1])


# The fewest bits a run's record takes: a run of pixels is a run of at least 4 bytes, written as
# flag + size (3 bits), a length of at least 3 bits and the 8-bit value.
_MIN_RUN_BITS = 14
_MAX_RECORD_BITS = 3 + 16 + 8


def mask_to_rle(mask: np.ndarray, max_bytes: int | None = None) -> list[int]:
    """A 2-D mask (bool, or uint8 0/255) -> Label Studio brush RLE, identical to `brush.mask2rle(0/255 mask)`.

    `max_bytes`: the most RLE bytes answered. A mask with too many runs (a speckled or striped mask: a
    10000 x 10000 checkerboard-like one takes 18 MB, 84 MB as JSON) raises AnswerTooLargeError; the runs are
    counted first, so such a mask is refused before its RLE is built. Built a chunk of runs at a time,
    the RLE costs temporaries of a few megabytes besides itself.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    flat = mask.ravel()
    on = flat.view(np.uint8) if flat.dtype == np.bool_ else (flat > 0).view(np.uint8)
    header = [(on.size * 4, 32), (8 - 1, _HEADER_WORDSIZE_BITS)] + [(size - 1, 4) for size in _RUN_SIZES]
    header_bits = sum(w for _, w in header)
    if max_bytes is not None:
        runs = _run_count(on)
        fewest = (header_bits + _MIN_RUN_BITS * runs) // 8 + 1
        if fewest > max_bytes:
            raise AnswerTooLargeError(
                f"the mask has {runs} runs: its brush RLE would take at least {fewest} bytes, over the limit of "
                f"{max_bytes} (MAX_BRUSH_RLE_BYTES); raise it, or answer polygons for such a speckled mask"
            )
    ends = _run_ends(on)
    lengths = np.diff(ends, prepend=-1) * 4  # each pixel is four RGBA bytes with the same value
    values = on[ends].astype(np.int64) * 255
    # Room for the longest records: each run's first one, and one more per 2**16 bytes of a long run.
    most_bits = header_bits + _MAX_RECORD_BITS * (ends.size + int(((lengths - 1) // _LONGEST_RUN).sum()))
    out = np.zeros(most_bits // 8 + 1, dtype=np.uint8)
    bit = _pack_into(out, np.array([c for c, _ in header], np.int64), np.array([w for _, w in header], np.int64), 0)
    for start in range(0, ends.size, _RUNS_PER_CHUNK):
        code, width = _records(lengths[start : start + _RUNS_PER_CHUNK], values[start : start + _RUNS_PER_CHUNK])
        bit = _pack_into(out, code, width, bit)
    size = (bit + 8 - bit % 8) // 8  # the converter pads with 8 - n % 8 bits: a whole zero byte when n % 8 == 0
    if max_bytes is not None and size > max_bytes:
        raise AnswerTooLargeError(
            f"the mask's brush RLE takes {size} bytes, over the limit of {max_bytes} (MAX_BRUSH_RLE_BYTES); "
            "raise it, or answer polygons for such a speckled mask"
        )
    return out[:size].tolist()
