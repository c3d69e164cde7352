"""The pieces that make a click cheap keep their exact answers: band-wise resize+threshold, the packed RLE,
the engine's memory arena options, features kept on the decoder's device, the object-like benchmark
weights, and the on-disk feature cache. The faster CPU variants: tests/test_quantize.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from label_studio_converter import brush

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnext_backend.engine import SegNextEngine, feature_device  # noqa: E402
from segnext_backend.geometry import MODEL_SIZE, ModelFrame, bilinear_resize, bilinear_resize_above  # noqa: E402
from segnext_backend.masks import logits_to_mask, mask_to_rle  # noqa: E402


@pytest.mark.parametrize(
    "in_hw, out_hw",
    [((64, 48), (300, 170)), ((64, 48), (100, 400)), ((50, 70), (20, 30)), ((1, 9), (5, 3)), ((33, 1), (7, 90))],
)
def test_resize_above_is_bit_identical_to_resize_then_compare(in_hw, out_hw):
    rng = np.random.default_rng(0)
    array = rng.normal(scale=2.0, size=in_hw).astype(np.float32)
    expected = bilinear_resize(array, *out_hw)
    for threshold in (-0.5, 0.0, float(np.median(expected)), float(expected.ravel()[7])):  # ties included
        got = bilinear_resize_above(array, *out_hw, threshold, tile_pixels=200)
        np.testing.assert_array_equal(got, expected > np.float32(threshold))


@pytest.mark.parametrize("out_hw", [(300, 170), (100, 400), (20, 30)])
def test_bands_skipped_far_from_the_threshold_keep_the_answer_exact(out_hw):
    yy, xx = np.mgrid[0:64, 0:48].astype(np.float32)
    blob = np.maximum((10.0 - np.hypot(xx - 20, yy - 30)) / 2.0, -8.0).astype(np.float32)  # plateau at -8
    expected = bilinear_resize(blob, *out_hw)
    for threshold in (-8.0, float(np.nextafter(np.float32(-8), np.float32(0))), -7.9999, -0.2, 0.0, 4.9, 5.0, 6.0):
        got = bilinear_resize_above(blob, *out_hw, threshold, tile_pixels=100)
        np.testing.assert_array_equal(got, expected > np.float32(threshold), err_msg=str(threshold))


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 3000), height=st.integers(1, 3000), threshold=st.floats(-2, 2, width=32))
def test_frame_mask_is_exactly_the_resized_logits_over_the_threshold(width, height, threshold):
    rng = np.random.default_rng(width * 7919 + height)
    logits = rng.normal(scale=2.0, size=(MODEL_SIZE, MODEL_SIZE)).astype(np.float32)
    frame = ModelFrame(width, height)
    np.testing.assert_array_equal(frame.logits_to_frame_above(logits, threshold), frame.logits_to_frame(logits) > np.float32(threshold))


def test_logits_to_mask_on_a_12_mp_frame_matches_the_full_float_path():
    yy, xx = np.mgrid[0:MODEL_SIZE, 0:MODEL_SIZE].astype(np.float32)
    logits = (150.0 - np.hypot(xx - 500, yy - 400)) / 8.0
    frame = ModelFrame(4000, 3000)
    result = logits_to_mask(logits, frame, 0.49)
    expected = frame.logits_to_frame(logits) > np.float32(np.log(0.49 / 0.51))
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


def test_object_like_weights_put_the_median_logit_at_zero_and_the_masks_in_regions():
    torch = pytest.importorskip("torch")
    from tools.build_benchmark_models import make_object_like_, object_like_calibration_images
    from tools.segnext_arch import SegNextConfig, SegNextDecoder, SegNextEncoder, SegNextModel

    model = SegNextModel(SegNextConfig.shallow(), seed=0)
    images = object_like_calibration_images(count=1)
    make_object_like_(model, images)
    with torch.no_grad():
        logits = SegNextDecoder(model)(
            SegNextEncoder(model)(images[0]), torch.tensor([[[512.0, 512.0]]]), torch.ones(1, 1), torch.zeros(1, 1, 1024, 1024)
        )[0, 0].numpy()
    assert abs(float(np.median(logits))) < 1e-3 * float(np.abs(logits).max())
    assert np.percentile(np.abs(logits), 90) > 5  # sigmoids near 0 or 1, as a trained model's
    mask = logits > 0
    # Regions, not pixel noise: almost every pixel has the same answer as its right-hand neighbour.
    assert (mask[:, 1:] == mask[:, :-1]).mean() > 0.98


# -- features stay on the decoder's device between clicks ------------------------------------------------------
# The CUDA path is this code with device "cuda": the engine binds the cached features to the decoder without
# copying them. Here (no GPU) the device is the CPU, which runs every line of it but the device name.


def test_feature_device_follows_the_decoders_first_active_provider():
    assert feature_device(["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cuda"
    assert feature_device(["CPUExecutionProvider"]) == "cpu"
    assert feature_device(["CPUExecutionProvider", "CUDAExecutionProvider"]) == "cpu"


def test_bound_encode_and_decode_give_exactly_what_plain_session_runs_give(shallow_models):
    engine = SegNextEngine(*shallow_models, intra_op_threads=1)
    rng = np.random.default_rng(3)
    image = rng.random((1, 3, MODEL_SIZE, MODEL_SIZE), dtype=np.float32)
    features = engine.encode(image)
    assert features.device_name() == engine.feature_device == "cpu" and features.shape() == [1, 768, 64, 64]
    (expected_features,) = engine.encoder.run(["image_feats"], {"image": image})
    np.testing.assert_array_equal(features.numpy(), expected_features)

    def plain_decode(clicks, labels, prev):
        feeds = {
            "image_feats": expected_features,
            "point_coords": np.array([clicks], np.float32),
            "point_labels": np.array([labels], np.float32),
            "prev_mask": prev.reshape(1, 1, MODEL_SIZE, MODEL_SIZE),
        }
        return engine.decoder.run(["mask"], feeds)[0][0, 0]

    prev = rng.random((MODEL_SIZE, MODEL_SIZE), dtype=np.float32)
    first = engine.decode(features, [[500.0, 400.0]], [1.0], np.zeros_like(prev))
    second = engine.decode(features, [[500.0, 400.0], [100.0, 900.0]], [1.0, 0.0], prev)
    from_host = engine.decode(expected_features, [[500.0, 400.0], [100.0, 900.0]], [1.0, 0.0], prev)
    import gc

    gc.collect()  # the logits must own their memory once the binding that produced them is gone
    np.testing.assert_array_equal(first, plain_decode([[500.0, 400.0]], [1.0], np.zeros_like(prev)))
    np.testing.assert_array_equal(second, plain_decode([[500.0, 400.0], [100.0, 900.0]], [1.0, 0.0], prev))
    np.testing.assert_array_equal(from_host, second)
    assert not np.array_equal(first, second)


def test_features_loaded_from_host_memory_own_their_copy(test_model_paths):
    import gc

    engine = SegNextEngine(*test_model_paths, intra_op_threads=1)
    stored = np.random.default_rng(4).normal(size=(1, 768, 64, 64)).astype(np.float16)  # as the disk cache holds
    view = engine.features_from_numpy(stored).numpy()  # the OrtValue itself is gone after this line
    gc.collect()
    reused = [np.full(stored.shape, 9.0, np.float32) for _ in range(8)]  # would take over freed memory
    np.testing.assert_array_equal(view, stored.astype(np.float32))
    assert all((array == 9.0).all() for array in reused)
    with pytest.raises(ValueError, match="features must be"):
        engine.features_from_numpy(np.zeros((1, 768, 32, 32), np.float32))


def test_clicks_reuse_the_cached_features_without_copying_them(test_model_paths):
    from conftest import make_scene

    scene = make_scene(800, 600)
    segmenter, spy = _segmenter(test_model_paths, scene)
    from segnext_backend.segmenter import Click

    x, y = scene.inside_point(1)
    for count in (1, 2, 3):
        segmenter.predict("img", [Click(x, y), Click(x + 3, y), Click(x, y + 3)][:count], 800, 600)
    cached = segmenter.feature_cache.get("img").features
    assert spy.encodes == 1 and len(spy.decodes) == 3
    # The very object the encoder wrote into, on the decoder's device: no per-click host round trip.
    assert all(decode["features"] is cached for decode in spy.decodes)
    assert cached.device_name() == spy.engine.feature_device


def test_an_unavailable_gpu_provider_falls_back_to_host_features_and_says_so(test_model_paths, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA execution provider")
    with caplog.at_level("WARNING", logger="segnext_backend.engine"), pytest.warns(UserWarning):
        engine = SegNextEngine(*test_model_paths, intra_op_threads=1, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert engine.feature_device == "cpu"
    assert any("CUDAExecutionProvider could not be started" in r.getMessage() for r in caplog.records)
    features = engine.encode(np.zeros((1, 3, MODEL_SIZE, MODEL_SIZE), np.float32))
    assert engine.decode(features, [[10.0, 10.0]], [1.0], np.zeros((MODEL_SIZE, MODEL_SIZE), np.float32)).shape == (
        MODEL_SIZE,
        MODEL_SIZE,
    )


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

    default, _ = _segmenter(test_model_paths, scene)
    assert default.feature_disk_cache_dir is None
    default.predict("img", clicks, scene.width, scene.height)


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
