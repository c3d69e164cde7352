"""The mappings between an image's frame and the 1024 model frame, checked against torch and a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segnext_backend.geometry import MODEL_SIZE, ModelFrame, bilinear_resize, to_model_input
from segnext_backend.masks import sigmoid


def reference_resize(array: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres written pixel by pixel from the definition torch documents for
    `align_corners=False` (slow, obviously right)."""

    def source(i, in_size, out_size):
        return max((i + 0.5) * in_size / out_size - 0.5, 0.0)

    in_h, in_w = array.shape[:2]
    out = np.zeros((out_h, out_w) + array.shape[2:], dtype=np.float64)
    for oy in range(out_h):
        sy = source(oy, in_h, out_h)
        y0 = min(int(np.floor(sy)), in_h - 1)
        y1, wy = min(y0 + 1, in_h - 1), sy - y0
        for ox in range(out_w):
            sx = source(ox, in_w, out_w)
            x0 = min(int(np.floor(sx)), in_w - 1)
            x1, wx = min(x0 + 1, in_w - 1), sx - x0
            top = (1 - wx) * array[y0, x0].astype(np.float64) + wx * array[y0, x1]
            bottom = (1 - wx) * array[y1, x0].astype(np.float64) + wx * array[y1, x1]
            out[oy, ox] = (1 - wy) * top + wy * bottom
    return out


@pytest.mark.parametrize("in_shape, out_shape", [((7, 5), (16, 11)), ((40, 31), (9, 13)), ((12, 50), (30, 8)), ((1, 9), (4, 3))])
def test_resize_matches_the_definition(in_shape, out_shape):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=in_shape + (3,), dtype=np.uint8)
    ours = bilinear_resize(array, *out_shape)
    assert ours.dtype == np.float32 and ours.shape == out_shape + (3,)
    # Our source positions are float32, as torch's are: a thousandth of a grey level from the exact ones.
    np.testing.assert_allclose(ours, reference_resize(array, *out_shape), atol=1e-3)


@pytest.mark.parametrize("in_hw, out_hw", [((300, 200), (1024, 1024)), ((1500, 2100), (1024, 1024)), ((1024, 1024), (480, 640))])
def test_resize_matches_torch_interpolate(in_hw, out_hw):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    image = rng.random(in_hw + (3,), dtype=np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image.transpose(2, 0, 1))[None], size=out_hw, mode="bilinear", align_corners=False
    )[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(bilinear_resize(image, *out_hw), expected, atol=2e-4)


@pytest.mark.parametrize(
    "in_size, out_size", [(1024, 480), (1024, 640), (1024, 3000), (1024, 4000), (640, 1024), (3000, 1024), (1000, 1024), (1024, 1)]
)
def test_resize_weights_are_torchs(in_size, out_size):
    """Resizing one-hot rows gives each source pixel's weight exactly, torch's and ours."""
    torch = pytest.importorskip("torch")
    one_hot = np.eye(in_size, dtype=np.float32).reshape(in_size, 1, in_size)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(one_hot)[None], size=(1, out_size), mode="bilinear", align_corners=False
    )[0, :, 0].numpy()
    ours = bilinear_resize(one_hot.transpose(1, 2, 0), 1, out_size)[0].T
    # Bit for bit on the CPUs this was written on (torch fuses the multiply and the subtraction); a few float32
    # steps allowed for builds that do not. Positions computed in float64 would be ~5e-5 off.
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)


def test_model_input_is_upstreams_stretch_without_antialiasing():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, size=(1700, 900, 3), dtype=np.uint8)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255, size=(1024, 1024), mode="bilinear", align_corners=False
    ).numpy()
    ours = to_model_input(rgb)
    assert ours.shape == (1, 3, 1024, 1024) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=2e-4)  # a fiftieth of one grey level
    assert ours.min() >= 0.0 and ours.max() <= 1.0


def test_model_input_differs_from_pillows_antialiased_shrink():
    """The reason the resize is ours: Pillow's BILINEAR averages when shrinking, upstream does not."""
    from PIL import Image

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(3000, 2000, 3), dtype=np.uint8)
    pillow = np.asarray(Image.fromarray(rgb).resize((1024, 1024), Image.BILINEAR), dtype=np.float32) / 255
    ours = to_model_input(rgb)[0].transpose(1, 2, 0)
    assert np.abs(ours - pillow).mean() > 0.05


def upstream_click(pixel: int, size: int) -> int:
    """Upstream's mapping of one pixel index, as its predictor runs it: an int64 tensor element times a Python
    float, plus 0.5, truncated by int()."""
    torch = pytest.importorskip("torch")
    return int(torch.tensor([pixel])[0] * (MODEL_SIZE / size) + 0.5)


def test_clicks_take_the_pixel_under_them_and_round_halves_up():
    frame = ModelFrame(width=2048, height=640)
    points = np.array([[0, 0], [1.0, 0.99], [1.999, 5.0], [3.0, 5.5], [2047.5, 639.0], [2048, 640], [1023.0, 320.2]])
    expected = [
        [0, 0],
        [1, 0],  # x pixel 1 lands on 0.5 and rounds up (rint would give 0); y 0.99 is still pixel 0
        [1, 8],  # pixel 1 again; y pixel 5 -> 8.0
        [2, 8],  # pixel 3 -> 1.5 -> 2 (rounded half up, as 1.5 to even would be too); y pixel 5 -> 8
        [1024, 1022],  # the last pixel of a 2048 px side lands on 1024: nothing is clipped
        [1024, 1022],  # the far edge (x = 100 %) is the last pixel
        [512, 512],  # pixel 1023 -> 511.5 -> 512; pixel 320 -> 512
    ]
    np.testing.assert_array_equal(frame.clicks_to_model_frame(points), expected)


@pytest.mark.parametrize("size", [1, 2, 3, 640, 1000, 1024, 2047, 2048, 3000, 4000, 4096, 6000, 20000])
def test_click_mapping_is_upstreams_for_every_pixel(size):
    torch = pytest.importorskip("torch")
    pixels = np.arange(size)
    # Upstream's expression, vectorised exactly as torch runs it element by element (int64 * float -> float32).
    expected = (torch.from_numpy(pixels) * (MODEL_SIZE / size) + 0.5).to(torch.int64).numpy()
    assert all(upstream_click(int(p), size) == e for p, e in zip(pixels[[0, size // 3, size // 2, -1]], expected[[0, size // 3, size // 2, -1]]))
    centres = np.stack([pixels + 0.5, pixels + 0.5], axis=1)
    got = ModelFrame(size, size).clicks_to_model_frame(centres)
    np.testing.assert_array_equal(got[:, 0], expected)
    np.testing.assert_array_equal(got[:, 1], expected)
    # Positions on the left edge of each pixel are in that pixel too.
    np.testing.assert_array_equal(ModelFrame(size, size).clicks_to_model_frame(np.stack([pixels, pixels], 1))[:, 0], expected)


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    fx=st.floats(0, 1),
    fy=st.floats(0, 1),
)
def test_any_click_inside_the_image_maps_near_its_pixel(width, height, fx, fy):
    frame = ModelFrame(width, height)
    x, y = fx * width, fy * height
    (mx, my), = frame.clicks_to_model_frame(np.array([[x, y]])).tolist()
    assert mx == int(mx) and my == int(my)
    # Only the last pixel of a side of 2048 px or more may land on 1024, one past the last model pixel.
    assert 0 <= mx <= MODEL_SIZE - (width < 2048) and 0 <= my <= MODEL_SIZE - (height < 2048)
    # The model pixel is the clicked pixel's index scaled and rounded: half a model pixel away at most.
    px, py = min(int(np.floor(x)), width - 1), min(int(np.floor(y)), height - 1)
    assert abs(mx - px * MODEL_SIZE / width) <= 0.5 + 1e-3 and abs(my - py * MODEL_SIZE / height) <= 0.5 + 1e-3


def test_logits_back_to_the_frame_use_half_pixel_centres():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(MODEL_SIZE, MODEL_SIZE)).astype(np.float32)
    out = ModelFrame(width=3000, height=700).logits_to_frame(logits)
    assert out.shape == (700, 3000)
    # align_corners=False: frame pixel i samples model position (i + 0.5) * 1024 / size - 0.5, clamped at 0
    # (with corners aligned, frame pixel (0, 0) would be model pixel (0, 0) exactly).
    wy = 0.5 * 1024 / 700 - 0.5  # row 0: 0.2314 between model rows 0 and 1
    for column, wx in [(0, 0.0), (2, 2.5 * 1024 / 3000 - 0.5)]:  # column 0 clamped to 0; column 2: 0.3533
        expected = (1 - wy) * ((1 - wx) * logits[0, 0] + wx * logits[0, 1]) + wy * ((1 - wx) * logits[1, 0] + wx * logits[1, 1])
        assert out[0, column] == pytest.approx(expected, abs=1e-5)
    assert abs(out[0, 0] - logits[0, 0]) > 1e-3
    same = ModelFrame(MODEL_SIZE, MODEL_SIZE).logits_to_frame(logits)
    np.testing.assert_array_equal(same, logits)


# Thin frames: sides past 2**24, where float32 no longer holds every pixel index (torch's positions round too).
THIN = [(1, 2**24 + 4099), (2**24 + 4099, 1), (3, 5_000_001)]


@pytest.mark.parametrize("width, height", [(640, 480), (4000, 3000), (1024, 1024), (1023, 2049), (7, 5000)] + THIN)
def test_prev_mask_round_trip_is_torchs_resize_sigmoid_resize(width, height):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(width + height)
    logits = rng.normal(scale=4.0, size=(MODEL_SIZE, MODEL_SIZE)).astype(np.float32)
    full = F.interpolate(torch.from_numpy(logits)[None, None], size=(height, width), mode="bilinear", align_corners=False)
    expected = F.interpolate(torch.sigmoid(full), size=(MODEL_SIZE, MODEL_SIZE), mode="bilinear", align_corners=False)
    got = ModelFrame(width, height).through_frame(logits, sigmoid)
    assert got.shape == (MODEL_SIZE, MODEL_SIZE) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected[0, 0].numpy(), rtol=0, atol=2e-5)
    # The round trip is not the identity: feeding sigmoid(1024 logits) instead moves prev_mask visibly.
    if (width, height) != (MODEL_SIZE, MODEL_SIZE):
        assert np.abs(got - sigmoid(logits)).max() > 0.05


def test_round_trip_reads_at_most_2048_rows_and_columns_of_the_frame():
    seen = []

    def spy(values):
        seen.append(values.shape)
        return values

    ModelFrame(20000, 15000).through_frame(np.zeros((MODEL_SIZE, MODEL_SIZE), np.float32), spy)
    assert seen == [(2048, 2048)]
    ModelFrame(300, 200).through_frame(np.zeros((MODEL_SIZE, MODEL_SIZE), np.float32), spy)
    assert seen[-1] == (200, 300)


def test_frames_must_have_a_size():
    with pytest.raises(ValueError):
        ModelFrame(0, 10)


@pytest.mark.parametrize("width, height", THIN + [(3000, 2000)])
def test_the_mask_of_a_thin_frame_is_torchs_resize_over_the_threshold(width, height):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(width + 3 * height)
    yy, xx = np.mgrid[0:MODEL_SIZE, 0:MODEL_SIZE].astype(np.float32)
    logits = (200.0 - np.hypot(xx - 500, yy - 450)) / 20.0 + rng.normal(scale=0.5, size=xx.shape).astype(np.float32)
    full = torch.nn.functional.interpolate(
        torch.from_numpy(logits)[None, None], size=(height, width), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    mask = ModelFrame(width, height).logits_to_frame_above(logits, 0.0)
    assert mask.shape == (height, width) and 0.1 < mask.mean() < 0.9
    # torch blends the rows and the columns in another order: only values within float rounding of the
    # threshold may fall on the other side.
    differ = mask != (full > 0)
    assert np.abs(full[differ]).max(initial=0.0) < 1e-4


@pytest.mark.parametrize("width, height", [(1, 20_000_000), (20_000_000, 1), (4000, 5000)])
def test_a_frame_costs_memory_and_python_steps_per_pixel_whatever_its_shape(width, height, monkeypatch):
    """The mask (one byte per pixel) plus a constant, and one step of Python per tile of pixels: a thin
    frame once cost 24 bytes per pixel of its long side in taps, and a step per 64 rows."""
    import tracemalloc

    from segnext_backend import geometry

    steps = [0]
    blend = geometry._blend

    def counted_blend(*args):
        steps[0] += 1
        return blend(*args)

    monkeypatch.setattr(geometry, "_blend", counted_blend)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(MODEL_SIZE, MODEL_SIZE)).astype(np.float32)  # no band can be skipped
    frame = ModelFrame(width, height)
    tracemalloc.start()
    try:
        mask = frame.logits_to_frame_above(logits, 0.0)
        frame.through_frame(logits, sigmoid)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert mask.shape == (height, width)
    assert peak < width * height + 64 * 2**20  # the round trip alone holds up to 2048 x 2048 floats, twice
    assert steps[0] <= 2 * (width * height // geometry.TILE_PIXELS + 1) + 16
