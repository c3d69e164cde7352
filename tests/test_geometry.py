"""The mappings between an image's frame and the 1024 model frame, checked against torch and a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segnext_backend.geometry import MODEL_SIZE, ModelFrame, bilinear_resize, to_model_input


def reference_resize(array: np.ndarray, out_h: int, out_w: int, align_corners: bool) -> np.ndarray:
    """Bilinear resize written pixel by pixel from the definition torch documents (slow, obviously right)."""

    def source(i, in_size, out_size):
        if align_corners:
            return i * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
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


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("in_shape, out_shape", [((7, 5), (16, 11)), ((40, 31), (9, 13)), ((12, 50), (30, 8)), ((1, 9), (4, 3))])
def test_resize_matches_the_definition(in_shape, out_shape, align_corners):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=in_shape + (3,), dtype=np.uint8)
    ours = bilinear_resize(array, *out_shape, align_corners=align_corners)
    assert ours.dtype == np.float32 and ours.shape == out_shape + (3,)
    np.testing.assert_allclose(ours, reference_resize(array, *out_shape, align_corners), atol=2e-4)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("in_hw, out_hw", [((300, 200), (1024, 1024)), ((1500, 2100), (1024, 1024)), ((1024, 1024), (480, 640))])
def test_resize_matches_torch_interpolate(in_hw, out_hw, align_corners):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    image = rng.random(in_hw + (3,), dtype=np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(image.transpose(2, 0, 1))[None], size=out_hw, mode="bilinear", align_corners=align_corners
    )[0].numpy().transpose(1, 2, 0)
    # torch computes source positions in float32, we in float64: weights differ in the 4th decimal at most.
    np.testing.assert_allclose(bilinear_resize(image, *out_hw, align_corners=align_corners), expected, atol=2e-4)


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


def test_clicks_scale_x_and_y_separately_and_round():
    frame = ModelFrame(width=2000, height=500)
    points = np.array([[0, 0], [1000, 250], [2000, 500], [1.0, 0.2], [100.3, 100.3]])
    expected = [
        [0, 0],
        [512, 512],
        [1023, 1023],  # the far edge stays on the last model pixel
        [round(1.0 * 1024 / 2000), round(0.2 * 1024 / 500)],
        [round(100.3 * 1024 / 2000), round(100.3 * 1024 / 500)],
    ]
    np.testing.assert_array_equal(frame.clicks_to_model_frame(points), expected)


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    fx=st.floats(0, 1),
    fy=st.floats(0, 1),
)
def test_any_click_inside_the_image_maps_inside_the_model_frame_and_back(width, height, fx, fy):
    frame = ModelFrame(width, height)
    x, y = fx * width, fy * height
    (mx, my), = frame.clicks_to_model_frame(np.array([[x, y]])).tolist()
    assert 0 <= mx <= MODEL_SIZE - 1 and 0 <= my <= MODEL_SIZE - 1
    assert mx == int(mx) and my == int(my)
    # Back in the image, the click moved by half a model pixel at most, or one on the clamped far edge.
    limit_x = width / MODEL_SIZE * (1.0 if x * MODEL_SIZE / width > MODEL_SIZE - 0.5 else 0.5)
    limit_y = height / MODEL_SIZE * (1.0 if y * MODEL_SIZE / height > MODEL_SIZE - 0.5 else 0.5)
    assert abs(mx * width / MODEL_SIZE - x) <= limit_x * (1 + 1e-9)
    assert abs(my * height / MODEL_SIZE - y) <= limit_y * (1 + 1e-9)


def test_logits_back_to_the_frame_keep_the_corners():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(MODEL_SIZE, MODEL_SIZE)).astype(np.float32)
    out = ModelFrame(width=3000, height=700).logits_to_frame(logits)
    assert out.shape == (700, 3000)
    # align_corners=True: the corner pixels of both frames coincide.
    for (oy, ox), (iy, ix) in [((0, 0), (0, 0)), ((-1, -1), (-1, -1)), ((0, -1), (0, -1)), ((-1, 0), (-1, 0))]:
        assert out[oy, ox] == pytest.approx(logits[iy, ix], abs=1e-6)
    same = ModelFrame(MODEL_SIZE, MODEL_SIZE).logits_to_frame(logits)
    np.testing.assert_array_equal(same, logits)


def test_frames_must_have_a_size():
    with pytest.raises(ValueError):
        ModelFrame(0, 10)
