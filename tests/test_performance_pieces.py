"""The pieces that make a click cheap keep their exact answers: band-wise resize+threshold, the packed RLE,
the engine's memory arena options, and the int8 quantisation tool (tools/quantize.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_converter import brush

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnext_backend.engine import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS  # noqa: E402
from segnext_backend.engine import SegNextEngine, check_interface  # noqa: E402
from segnext_backend.geometry import MODEL_SIZE, ModelFrame, bilinear_resize, bilinear_resize_at_least  # noqa: E402
from segnext_backend.masks import logits_to_mask, mask_to_rle  # noqa: E402


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(
    "in_hw, out_hw",
    [((64, 48), (300, 170)), ((64, 48), (100, 400)), ((50, 70), (20, 30)), ((1, 9), (5, 3)), ((33, 1), (7, 90))],
)
def test_resize_at_least_is_bit_identical_to_resize_then_compare(in_hw, out_hw, align_corners):
    rng = np.random.default_rng(0)
    array = rng.normal(scale=2.0, size=in_hw).astype(np.float32)
    expected = bilinear_resize(array, *out_hw, align_corners=align_corners)
    for threshold in (-0.5, 0.0, float(np.median(expected)), float(expected.ravel()[7])):  # ties included
        got = bilinear_resize_at_least(array, *out_hw, threshold, align_corners=align_corners, block_rows=16)
        np.testing.assert_array_equal(got, expected >= np.float32(threshold))


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("out_hw", [(300, 170), (100, 400), (20, 30)])
def test_bands_skipped_far_from_the_threshold_keep_the_answer_exact(out_hw, align_corners):
    yy, xx = np.mgrid[0:64, 0:48].astype(np.float32)
    blob = np.maximum((10.0 - np.hypot(xx - 20, yy - 30)) / 2.0, -8.0).astype(np.float32)  # plateau at -8
    expected = bilinear_resize(blob, *out_hw, align_corners=align_corners)
    for threshold in (-8.0, float(np.nextafter(np.float32(-8), np.float32(0))), -7.9999, -0.2, 0.0, 4.9, 5.0, 6.0):
        got = bilinear_resize_at_least(blob, *out_hw, threshold, align_corners=align_corners, block_rows=8)
        np.testing.assert_array_equal(got, expected >= np.float32(threshold), err_msg=str(threshold))


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), threshold=st.floats(-2, 2, width=32))
def test_frame_mask_is_exactly_the_resized_logits_over_the_threshold(width, height, threshold):
    rng = np.random.default_rng(width * 7919 + height)
    logits = rng.normal(scale=2.0, size=(MODEL_SIZE, MODEL_SIZE)).astype(np.float32)
    frame = ModelFrame(width, height)
    np.testing.assert_array_equal(frame.logits_to_frame_at_least(logits, threshold), frame.logits_to_frame(logits) >= np.float32(threshold))


def test_logits_to_mask_on_a_12_mp_frame_matches_the_full_float_path():
    yy, xx = np.mgrid[0:MODEL_SIZE, 0:MODEL_SIZE].astype(np.float32)
    logits = (150.0 - np.hypot(xx - 500, yy - 400)) / 8.0
    frame = ModelFrame(4000, 3000)
    result = logits_to_mask(logits, frame, 0.49)
    expected = frame.logits_to_frame(logits) >= np.float32(np.log(0.49 / 0.51))
    np.testing.assert_array_equal(result.mask, expected)


def test_packed_rle_matches_the_converter_on_mixed_runs():
    rng = np.random.default_rng(5)
    mask = np.zeros((180, 400), bool)
    mask[20:150, 30:380] = True  # long runs (over 2**16 bytes across rows) ...
    mask[60:90] = rng.random((30, 400)) > 0.5  # ... and many short ones
    assert mask_to_rle(mask) == list(brush.mask2rle(mask.astype(np.uint8) * 255))
    assert mask_to_rle(mask.astype(np.uint8) * 255) == mask_to_rle(mask)
    assert mask_to_rle(np.asfortranarray(mask)) == mask_to_rle(mask)  # not C-contiguous


def test_engine_memory_arena_options(test_model_paths):
    engine = SegNextEngine(*test_model_paths, intra_op_threads=1)
    assert engine.encoder.get_session_options().enable_cpu_mem_arena is False
    assert engine.decoder.get_session_options().enable_cpu_mem_arena is True
    engine = SegNextEngine(*test_model_paths, intra_op_threads=1, encoder_memory_arena=True, decoder_memory_arena=False)
    assert engine.encoder.get_session_options().enable_cpu_mem_arena is True
    assert engine.decoder.get_session_options().enable_cpu_mem_arena is False


@pytest.fixture(scope="module")
def shallow_models(tmp_path_factory):
    pytest.importorskip("torch")
    from tools.build_benchmark_models import export_models
    from tools.segnext_arch import SegNextConfig, SegNextModel

    return export_models(SegNextModel(SegNextConfig.shallow(), seed=0), tmp_path_factory.mktemp("shallow"))


def test_quantize_command_writes_int8_models_with_segnext_interface(shallow_models):
    import onnx
    import onnxruntime as ort

    from tools.quantize import main

    encoder, decoder = shallow_models
    assert main([str(encoder.parent)]) == 0
    encoder8, decoder8 = encoder.with_name("encoder.int8.onnx"), decoder.with_name("decoder.int8.onnx")
    for path, inputs, outputs in ((encoder8, ENCODER_INPUTS, ENCODER_OUTPUTS), (decoder8, DECODER_INPUTS, DECODER_OUTPUTS)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        check_interface(session, str(path), inputs, outputs)
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops, ops
        assert path.stat().st_size < (encoder if path == encoder8 else decoder).stat().st_size
    # And the engine serves them, with logits close to fp32 on the same input.
    fp32 = SegNextEngine(encoder, decoder, intra_op_threads=1)
    int8 = SegNextEngine(encoder8, decoder8, intra_op_threads=1)
    image = np.random.default_rng(0).random((1, 3, MODEL_SIZE, MODEL_SIZE), dtype=np.float32)
    args = (np.array([[500.0, 400.0]], np.float32), np.array([1.0], np.float32), np.zeros((MODEL_SIZE, MODEL_SIZE), np.float32))
    logits32 = fp32.decode(fp32.encode(image), *args)
    logits8 = int8.decode(int8.encode(image), *args)
    assert logits8.shape == (MODEL_SIZE, MODEL_SIZE) and np.isfinite(logits8).all()
    assert np.corrcoef(logits32.ravel(), logits8.ravel())[0, 1] > 0.9


# -- the optional on-disk float16 feature cache ----------------------------------------------------------------


def _segmenter(test_model_paths, scene, **options):
    from conftest import EngineSpy

    from segnext_backend.segmenter import InteractiveSegmenter

    spy = EngineSpy(SegNextEngine(*test_model_paths, intra_op_threads=1))
    segmenter = InteractiveSegmenter(spy, lambda key: scene.pixels, **options)
    return segmenter, spy


def test_disk_feature_cache_round_trip(test_model_paths, tmp_path):
    from conftest import iou, make_scene

    from segnext_backend.segmenter import Click

    scene = make_scene(640, 480)
    clicks = [Click(*scene.inside_point(1))]
    first, first_spy = _segmenter(test_model_paths, scene, feature_disk_cache_dir=tmp_path / "features")
    expected = first.predict("img-1", clicks, scene.width, scene.height)
    assert first_spy.encodes == 1 and not expected.timings.disk_cache_hit
    files = list((tmp_path / "features").glob("*.npz"))
    assert len(files) == 1
    with np.load(files[0]) as stored:
        assert stored["features"].dtype == np.float16 and stored["features"].shape == (1, 768, 64, 64)
        assert (int(stored["width"]), int(stored["height"])) == (640, 480)
    first.shutdown()

    # A new process (a restart) finds the features on disk: no encode, the same mask.
    second, second_spy = _segmenter(test_model_paths, scene, feature_disk_cache_dir=tmp_path / "features")
    again = second.predict("img-1", clicks, scene.width, scene.height)
    assert second_spy.encodes == 0 and again.timings.disk_cache_hit and not again.timings.feature_cache_hit
    assert (again.image_width, again.image_height) == (640, 480)
    assert iou(again.object_mask.mask, expected.object_mask.mask) == 1.0
    assert iou(again.object_mask.mask, scene.objects[1]) > 0.95
    # Another image key is not served from this file.
    second.predict("img-2", clicks, scene.width, scene.height)
    assert second_spy.encodes == 1
    second.shutdown()


def test_disk_feature_cache_ignores_unreadable_files_and_is_off_by_default(test_model_paths, tmp_path):
    from conftest import make_scene

    from segnext_backend.segmenter import Click

    scene = make_scene(320, 240)
    clicks = [Click(*scene.inside_point(0))]
    segmenter, spy = _segmenter(test_model_paths, scene, feature_disk_cache_dir=tmp_path)
    segmenter.predict("img", clicks, scene.width, scene.height)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not an npz")
    segmenter.feature_cache.clear()
    segmenter.predict("img", clicks, scene.width, scene.height)
    assert spy.encodes == 2  # the broken file was ignored, and rewritten
    segmenter.shutdown()

    default, _ = _segmenter(test_model_paths, scene)
    assert default.feature_disk_cache_dir is None
    default.predict("img", clicks, scene.width, scene.height)
    default.shutdown()


def test_disk_feature_cache_stays_within_its_byte_budget(test_model_paths, tmp_path):
    import time

    from conftest import make_scene

    from segnext_backend.segmenter import Click

    scene = make_scene(320, 240)
    one_file = None
    segmenter, _ = _segmenter(test_model_paths, scene, feature_disk_cache_dir=tmp_path, feature_disk_cache_bytes=10**12)
    segmenter.predict("first", [Click(10, 10)], 320, 240)
    (only,) = tmp_path.glob("*.npz")
    one_file = only.stat().st_size
    # Room for two files: after three images, the least recently used (the first) is gone.
    segmenter, _ = _segmenter(test_model_paths, scene, feature_disk_cache_dir=tmp_path, feature_disk_cache_bytes=2 * one_file)
    for key in ("second", "third"):
        time.sleep(0.01)
        segmenter.predict(key, [Click(10, 10)], 320, 240)
    remaining = sorted(tmp_path.glob("*.npz"))
    assert len(remaining) == 2 and only not in remaining
    assert sum(p.stat().st_size for p in remaining) <= 2 * one_file
