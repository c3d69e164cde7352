"""Logits to mask, and mask to Label Studio's brush RLE, against label-studio-converter's own code."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from label_studio_converter import brush

from segnext_backend.geometry import ModelFrame
from segnext_backend.masks import logits_to_mask, mask_to_rle, sigmoid


def library_rle(mask: np.ndarray) -> list[int]:
    return list(brush.mask2rle(mask.astype(np.uint8) * 255))


def structured_masks():
    rng = np.random.default_rng(0)
    yield np.zeros((5, 7), bool)
    yield np.ones((300, 301), bool)  # one run longer than 2**16 values
    yield rng.random((40, 50)) > 0.5  # many short runs
    yield np.zeros((1, 1), bool)
    yield np.ones((1, 1), bool)
    blob = np.zeros((480, 640), bool)
    blob[100:300, 200:500] = True
    yield blob
    for length in (1, 2, 3, 4, 5, 16, 17, 64, 65, 16383, 16384, 16385, 32768):
        row = np.zeros((1, length + 3), bool)
        row[0, 1 : length + 1] = True  # runs of 4 * length bytes: each size class and its edges
        yield row


@pytest.mark.parametrize("mask", list(structured_masks()), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_rle_is_identical_to_label_studio_converter(mask):
    assert mask_to_rle(mask) == library_rle(mask)


@settings(max_examples=150, deadline=None)
@given(
    mask=arrays(
        np.bool_,
        st.tuples(st.integers(1, 60), st.integers(1, 60)),
        elements=st.booleans(),
    )
)
def test_rle_round_trips_through_label_studio_converter(mask):
    rle = mask_to_rle(mask)
    assert rle == library_rle(mask)
    decoded = brush.decode_rle(rle).reshape(mask.shape[0], mask.shape[1], 4)
    np.testing.assert_array_equal(decoded[:, :, 3] > 0, mask)


def test_rle_accepts_0_255_masks_and_refuses_3d():
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 3:8] = 255
    assert mask_to_rle(mask) == library_rle(mask > 0)
    with pytest.raises(ValueError):
        mask_to_rle(np.zeros((2, 2, 2), bool))


def test_sigmoid_is_stable_for_large_logits():
    logits = np.array([-1000.0, -30.0, 0.0, 2.0, 30.0, 1000.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probability = sigmoid(logits)
    expected = [1 / (1 + math.exp(min(-v, 700))) for v in logits.tolist()]
    np.testing.assert_allclose(probability, expected, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("threshold", [0.49, 0.5, 0.2])
def test_mask_is_where_the_resized_probability_exceeds_the_threshold(threshold):
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3, size=(1024, 1024)).astype(np.float32)
    frame = ModelFrame(width=700, height=1300)
    result = logits_to_mask(logits, frame, threshold)
    probability = sigmoid(frame.logits_to_frame(logits))
    clear = np.abs(probability - threshold) > 1e-6  # leave float ties at the threshold out
    np.testing.assert_array_equal(result.mask[clear], (probability > threshold)[clear])
    inside = sigmoid(logits)[sigmoid(logits) > threshold]
    assert result.score == pytest.approx(float(inside.mean()), rel=1e-5)


@pytest.mark.parametrize("width, height", [(1024, 1024), (640, 480), (4000, 3000)])
def test_a_probability_exactly_at_the_threshold_is_out(width, height):
    """Upstream's evaluation keeps `probability > 0.49`: a pixel exactly at the threshold is not in."""
    at_threshold = np.float32(math.log(0.49 / 0.51))
    logits = np.full((1024, 1024), at_threshold, np.float32)
    logits[:100, :100] = np.nextafter(at_threshold, np.float32(1))  # one float32 step above: in
    result = logits_to_mask(logits, ModelFrame(width, height), 0.49)
    assert result.mask[0, 0] and not result.mask[-1, -1]
    assert result.mask.sum() < 0.02 * width * height


def test_empty_mask_scores_zero():
    logits = np.full((1024, 1024), -5.0, np.float32)
    result = logits_to_mask(logits, ModelFrame(640, 480), 0.49)
    assert result.is_empty and result.score == 0.0


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 30), st.integers(1, 60))), st.integers(1, 9), st.integers(1, 9))
def test_rle_built_in_chunks_is_identical_across_chunk_edges(mask, scan_pixels, runs_per_chunk):
    from segnext_backend import masks

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(masks, "_SCAN_PIXELS", scan_pixels)
        patch.setattr(masks, "_RUNS_PER_CHUNK", runs_per_chunk)
        assert mask_to_rle(mask) == library_rle(mask)


def test_a_speckled_mask_is_refused_by_its_run_count_before_its_rle_is_built(monkeypatch):
    from segnext_backend import masks
    from segnext_backend.errors import AnswerTooLargeError

    stripes = np.zeros((400, 300), bool)
    stripes[:, ::4] = True  # runs of 1 and 3 pixels: 14- and 15-bit records
    flat = stripes.ravel()
    runs = 1 + int(np.count_nonzero(flat[1:] != flat[:-1]))
    size = len(mask_to_rle(stripes))
    assert size > (57 + 14 * runs) // 8 + 1  # more than the fewest bytes its runs could take
    assert mask_to_rle(stripes, max_bytes=size) == library_rle(stripes)  # at the limit: answered
    built = []
    monkeypatch.setattr(masks, "_records", lambda *args: built.append(1) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(AnswerTooLargeError, match="MAX_BRUSH_RLE_BYTES") as refused:
        mask_to_rle(stripes, max_bytes=size // 2)
    assert f"{runs} runs" in str(refused.value) and built == []  # counted, never built
    monkeypatch.undo()
    # Between the fewest bytes its runs could take and its real size: built, then refused by its size.
    with pytest.raises(AnswerTooLargeError, match=f"takes {size} bytes.*MAX_BRUSH_RLE_BYTES"):
        mask_to_rle(stripes, max_bytes=size - 1)
