"""Tests for segnext_backend/demo_models.py, the tiny SegNext stand-in models.

Other tests trust these models to produce known masks, so here they are
checked two ways: against reference_decode (bit-exact) and against boolean
masks computed independently from where the rectangles were drawn, so a bug
shared by the graph and the reference still fails.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # plain `pytest` does not put the root on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from segnext_backend.demo_models import (  # noqa: E402
    LOGIT,
    TEST_MODEL_METADATA_KEY,
    TOLERANCE,
    build_demo_models,
    reference_decode,
)

SIZE = 1024

# (row slice, col slice).  Deliberately not square and placed so that a click
# with x and y swapped lands somewhere else (background), which would show up.
RECTS = {
    "A": (slice(100, 300), slice(600, 900)),
    "B": (slice(500, 700), slice(50, 400)),
    "C": (slice(800, 1000), slice(450, 950)),
    # Same colour as A except +0.08 in red: must NOT be part of A's region,
    # which checks the tolerance is applied per channel (max over channels).
    "near_A": (slice(350, 450), slice(600, 900)),
    # A 1-pixel-wide strip on the last column, to see that out-of-frame clicks
    # are clipped to 1023 (not 1022, not wrapped around).
    "edge": (slice(0, 5), slice(1023, 1024)),
}
# One click (x, y) inside each rectangle.
CLICKS = {"A": (750.0, 200.0), "B": (250.0, 520.0), "C": (500.0, 900.0)}
NOISE = 0.01  # per-pixel jitter, well inside TOLERANCE, so matching is not exact-equality


def rect_mask(*names):
    m = np.zeros((SIZE, SIZE), dtype=bool)
    for name in names:
        m[RECTS[name]] = True
    return m


@pytest.fixture(scope="module")
def image():
    """Flat-colour (plus small noise) RGB image, (3, 1024, 1024) float32 in [0, 1]."""
    rng = np.random.default_rng(1234)
    # Palette values 0.2 apart: any two picked colours differ by >= 0.2 in
    # some channel, far beyond TOLERANCE even with noise.
    levels = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
    palette = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    background, a, b, c, edge = palette[rng.choice(len(palette), size=5, replace=False)]
    img = np.empty((3, SIZE, SIZE), dtype=np.float64)
    img[:] = background[:, None, None]
    for name, colour in (("A", a), ("B", b), ("C", c), ("near_A", a + [0.08, 0.0, 0.0]), ("edge", edge)):
        rows, cols = RECTS[name]
        img[:, rows, cols] = colour[:, None, None]
    img += rng.uniform(-NOISE, NOISE, size=img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    return build_demo_models(tmp_path_factory.mktemp("test_models"))


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def encoder(model_paths):
    return _session(model_paths[0])


@pytest.fixture(scope="module")
def decoder(model_paths):
    return _session(model_paths[1])


@pytest.fixture(scope="module")
def feats(encoder, image):
    return encoder.run(None, {"image": image[None]})[0]


def decode(decoder, feats, points, labels, prev):
    out = decoder.run(
        None,
        {
            "image_feats": feats,
            "point_coords": np.asarray(points, dtype=np.float32).reshape(1, -1, 2),
            "point_labels": np.asarray(labels, dtype=np.float32).reshape(1, -1),
            "prev_mask": np.asarray(prev, dtype=np.float32).reshape(1, 1, SIZE, SIZE),
        },
    )[0]
    assert out.shape == (1, 1, SIZE, SIZE) and out.dtype == np.float32
    return out[0, 0]


def sigmoid(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def check(logits, image, points, labels, prev, expected):
    """Decoder output == reference bit for bit, and == the expected boolean mask."""
    ref = reference_decode(image, np.asarray(points, np.float32), np.asarray(labels, np.float32), prev)
    np.testing.assert_array_equal(logits, ref)
    np.testing.assert_array_equal(ref > 0, expected)  # the reference itself is checked too
    np.testing.assert_array_equal(logits > 0, expected)
    assert set(np.unique(logits)) <= {np.float32(LOGIT), np.float32(-LOGIT)}


def test_swapped_clicks_land_on_background():
    # Guards the layout above: an x/y mix-up must change the mask.
    everything = rect_mask(*RECTS)
    for name, (x, y) in CLICKS.items():
        assert rect_mask(name)[int(y), int(x)]
        assert not everything[int(x), int(y)]


def test_constants():
    assert TEST_MODEL_METADATA_KEY == "segnext_backend.test_model"
    assert TOLERANCE == 0.05 and LOGIT == 8.0


def test_interface(encoder, decoder):
    def io(nodes):
        return [(n.name, n.shape, n.type) for n in nodes]

    assert io(encoder.get_inputs()) == [("image", [1, 3, 1024, 1024], "tensor(float)")]
    assert io(encoder.get_outputs()) == [("image_feats", [1, 768, 64, 64], "tensor(float)")]
    assert io(decoder.get_inputs()) == [
        ("image_feats", [1, 768, 64, 64], "tensor(float)"),
        ("point_coords", [1, "num_points", 2], "tensor(float)"),
        ("point_labels", [1, "num_points"], "tensor(float)"),
        ("prev_mask", [1, 1, 1024, 1024], "tensor(float)"),
    ]
    assert io(decoder.get_outputs()) == [("mask", [1, 1, 1024, 1024], "tensor(float)")]


def test_marked_as_test_models(model_paths):
    for path in model_paths:
        model = onnx.load(str(path))
        props = {p.key: p.value for p in model.metadata_props}
        assert props.get(TEST_MODEL_METADATA_KEY) == "true"
        assert "not segnext" in model.doc_string.lower()
        assert model.opset_import[0].version == 17
        # and visible to the server through onnxruntime, which is what it uses
        meta = _session(path).get_modelmeta()
        assert meta.custom_metadata_map.get(TEST_MODEL_METADATA_KEY) == "true"


def test_encoder_round_trip_is_lossless(encoder):
    img = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    feats = encoder.run(None, {"image": img})[0]
    assert feats.shape == (1, 768, 64, 64) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats.reshape(3, SIZE, SIZE), img[0])


def test_click_sequence_builds_up_the_mask(decoder, feats, image):
    # 1. Positive click on A, empty previous mask: exactly rectangle A
    #    (near_A is within 0.08 of A's colour but outside the tolerance).
    prev = np.zeros((SIZE, SIZE), np.float32)
    pts, lbl = [CLICKS["A"]], [1]
    logits1 = decode(decoder, feats, pts, lbl, prev)
    check(logits1, image, pts, lbl, prev, rect_mask("A"))

    # 2. Positive click on B, previous mask fed back as a probability: A | B.
    prev = sigmoid(logits1)
    pts, lbl = [CLICKS["A"], CLICKS["B"]], [1, 1]
    logits2 = decode(decoder, feats, pts, lbl, prev)
    check(logits2, image, pts, lbl, prev, rect_mask("A", "B"))

    # 3. Negative click on A: A's colour is removed, B stays.
    prev = sigmoid(logits2)
    pts, lbl = [CLICKS["A"], CLICKS["B"], CLICKS["A"]], [1, 1, 0]
    logits3 = decode(decoder, feats, pts, lbl, prev)
    check(logits3, image, pts, lbl, prev, rect_mask("B"))


def test_only_the_last_point_matters(decoder, feats, image):
    prev = np.zeros((SIZE, SIZE), np.float32)
    pts = [CLICKS["A"], CLICKS["B"], CLICKS["C"]]
    logits = decode(decoder, feats, pts, [1, 0, 1], prev)
    check(logits, image, pts, [1, 0, 1], prev, rect_mask("C"))


def test_padding_label_keeps_previous_mask(decoder, feats, image):
    prev = sigmoid(np.where(rect_mask("A", "C"), LOGIT, -LOGIT))
    pts = [CLICKS["B"], (0.0, 0.0)]
    logits = decode(decoder, feats, pts, [1, -1], prev)
    check(logits, image, pts, [1, -1], prev, rect_mask("A", "C"))


def test_click_outside_the_frame_is_clipped(decoder, feats, image):
    # (1500, -20) clips to (x=1023, y=0), which is on the edge strip.
    prev = np.zeros((SIZE, SIZE), np.float32)
    pts = [(1500.0, -20.0)]
    logits = decode(decoder, feats, pts, [1], prev)
    check(logits, image, pts, [1], prev, rect_mask("edge"))


def test_background_click_selects_everything_else(decoder, feats, image):
    prev = np.zeros((SIZE, SIZE), np.float32)
    pts = [(10.0, 10.0)]
    logits = decode(decoder, feats, pts, [1], prev)
    check(logits, image, pts, [1], prev, ~rect_mask(*RECTS))


def test_rebuild_is_clean_and_cli_works(tmp_path):
    enc, dec = build_demo_models(tmp_path / "new" / "dir")  # missing dirs are created
    assert (enc.name, dec.name) == ("encoder.onnx", "decoder.onnx")
    build_demo_models(enc.parent)  # overwriting in place works
    # atomic writes leave no temp files behind
    assert sorted(p.name for p in enc.parent.iterdir()) == ["decoder.onnx", "encoder.onnx"]

    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "segnext_backend.demo_models", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )
    assert result.stdout.split() == [str(out / "encoder.onnx"), str(out / "decoder.onnx")]
    for path in (out / "encoder.onnx", out / "decoder.onnx"):
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
