"""The inference package on its own: no Flask, no Label Studio, no network."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import pytest
from conftest import EngineSpy, iou, make_scene
from onnx import TensorProto, helper

from segnext_backend.engine import ModelInterfaceError, SegNextEngine
from segnext_backend.errors import RequestError
from segnext_backend.images import abort_download
from segnext_backend.masks import sigmoid
from segnext_backend.preencode import PreEncoder
from segnext_backend.segmenter import Click, InteractiveSegmenter


@pytest.fixture
def spy(test_model_paths):
    return EngineSpy(SegNextEngine(*test_model_paths, intra_op_threads=1))


def segmenter_for(spy, scenes: dict, **options) -> InteractiveSegmenter:
    loads = []

    def load_image(key):
        loads.append(key)
        return scenes[key].pixels

    segmenter = InteractiveSegmenter(spy, load_image, **options)
    segmenter.loads = loads
    return segmenter


def clicks_on(scene, *specs) -> list[Click]:
    return [Click(*scene.inside_point(index), positive=positive) for index, positive in specs]


def test_predict_is_the_clicked_object_and_k_clicks_cost_k_decodes(spy):
    scene = make_scene(1500, 1000)
    segmenter = segmenter_for(spy, {"img": scene})
    clicks = clicks_on(scene, (0, True), (1, True), (0, False))
    expected = [scene.objects[0], scene.objects[0] | scene.objects[1], scene.objects[1]]
    for k in range(1, 4):
        prediction = segmenter.predict("img", clicks[:k], 1500, 1000)
        assert iou(prediction.object_mask.mask, expected[k - 1]) >= 0.98
        assert prediction.timings.decoder_runs == 1
    assert spy.encodes == 1 and len(spy.decodes) == 3 and segmenter.loads == ["img"]
    again = segmenter.predict("img", clicks, 1500, 1000)  # the same sequence again: nothing to run
    assert again.timings.decoder_runs == 0 and len(spy.decodes) == 3


def test_evicted_prefix_is_replayed_to_the_same_mask(spy):
    scene = make_scene(800, 600, seed=2)
    clicks = clicks_on(scene, (0, True), (2, True), (0, False), (1, True))
    reference = segmenter_for(spy, {"img": scene})
    for k in range(1, 5):
        expected = reference.predict("img", clicks[:k], 800, 600).object_mask.mask

    # A state cache too small for even one state: every click replays its whole prefix.
    starved = segmenter_for(EngineSpy(spy.engine), {"img": scene}, object_state_cache_bytes=1)
    prediction = starved.predict("img", clicks, 800, 600)
    np.testing.assert_array_equal(prediction.object_mask.mask, expected)
    assert prediction.timings.decoder_runs == 4


def test_the_same_clicks_in_another_frame_size_do_not_reuse_the_state(spy):
    """prev_mask is the probability at the frame's size resized back, so an object's state belongs to the
    frame size Label Studio reports, not only to the model-frame clicks."""
    scene = make_scene(2048, 2048, seed=6)
    segmenter = segmenter_for(spy, {"img": scene})
    # Pixel 2p of a 2048 px side and pixel p of a 1024 px side both land on model pixel p.
    (x0, y0), (x1, y1) = (scene.inside_point(0), scene.inside_point(1))
    big = [Click(2 * (x0 // 2) + 0.5, 2 * (y0 // 2) + 0.5), Click(2 * (x1 // 2) + 0.5, 2 * (y1 // 2) + 0.5)]
    small = [Click(x0 // 2 + 0.5, y0 // 2 + 0.5), Click(x1 // 2 + 0.5, y1 // 2 + 0.5)]
    segmenter.predict("img", big, 2048, 2048)
    decodes = len(spy.decodes)
    segmenter.predict("img", small, 1024, 1024)
    assert len(spy.decodes) == decodes + 2  # no state of the 2048 frame was reused
    np.testing.assert_array_equal(spy.decodes[-1]["coords"], spy.decodes[1]["coords"])  # the same model clicks
    # In a 1024 frame the round trip is the identity: prev_mask is the sigmoid of the first click's logits.
    np.testing.assert_allclose(spy.decodes[-1]["prev_mask"], sigmoid(spy.decodes[-2]["logits"]), rtol=0, atol=1e-7)
    assert np.abs(spy.decodes[-1]["prev_mask"] - spy.decodes[1]["prev_mask"]).max() > 0.01


def test_two_objects_on_one_image_keep_separate_states(spy):
    scene = make_scene(800, 600, seed=3)
    segmenter = segmenter_for(spy, {"img": scene})
    first = segmenter.predict("img", clicks_on(scene, (0, True)), 800, 600)
    second = segmenter.predict("img", clicks_on(scene, (1, True)), 800, 600)
    assert iou(first.object_mask.mask, scene.objects[0]) >= 0.98
    assert iou(second.object_mask.mask, scene.objects[1]) >= 0.98
    assert not spy.decodes[1]["prev_mask"].any()  # a new object starts from zeros


def test_concurrent_first_clicks_on_one_image_encode_it_once(spy):
    scene = make_scene(1200, 800, seed=4)
    segmenter = segmenter_for(spy, {"img": scene})
    start = threading.Barrier(6)
    masks = {}

    def click(index):
        start.wait()
        masks[index] = segmenter.predict("img", clicks_on(scene, (index % 3, True)), 1200, 800).object_mask.mask

    threads = [threading.Thread(target=click, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert spy.encodes == 1 and segmenter.loads == ["img"]
    for index, mask in masks.items():
        assert iou(mask, scene.objects[index % 3]) >= 0.98


def test_background_encode_then_click_runs_no_encoder(spy):
    scene = make_scene(640, 480)
    segmenter = segmenter_for(spy, {"img": scene})
    pre_encoder = PreEncoder(segmenter.encoded_image, 4, abort_download)
    pre_encoder.submit("img")
    assert pre_encoder.wait_idle(60)
    pre_encoder.stop()
    prediction = segmenter.predict("img", clicks_on(scene, (1, True)), 640, 480)
    assert prediction.timings.feature_cache_hit and spy.encodes == 1


def test_feature_cache_is_bounded_by_bytes(spy):
    scenes = {f"img{i}": make_scene(320, 240, seed=i) for i in range(3)}
    one_image = 768 * 64 * 64 * 4
    segmenter = segmenter_for(spy, scenes, feature_cache_bytes=2 * one_image)
    for key, scene in scenes.items():
        segmenter.predict(key, clicks_on(scene, (0, True)), 320, 240)
    stats = segmenter.feature_cache.stats()
    assert stats.entries == 2 and stats.bytes == 2 * one_image and stats.evictions == 1
    segmenter.predict("img0", clicks_on(scenes["img0"], (1, True)), 320, 240)  # evicted: encoded again
    assert spy.encodes == 4


@pytest.mark.parametrize(
    "clicks, message",
    [
        ([], "at least one click"),
        ([Click(float("nan"), 1)], "finite"),
        ([Click(float("inf"), 1)], "finite"),
        ([Click(-0.1, 1)], "outside"),
        ([Click(1, 480.5)], "outside"),
        ([Click(1, 1)] * 11, "MAX_CLICKS"),
    ],
)
def test_bad_clicks_are_refused_before_any_work(spy, clicks, message):
    segmenter = segmenter_for(spy, {"img": make_scene(640, 480)}, max_clicks=10)
    with pytest.raises(RequestError, match=message):
        segmenter.predict("img", clicks, 640, 480)
    assert spy.encodes == 0 and segmenter.loads == []


def _identity_model(path, inputs: dict, outputs: dict):
    """An ONNX file whose inputs and outputs have the given names and shapes (it computes nothing useful)."""
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()]
    graph_outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()]
    first = next(iter(inputs))
    nodes = [helper.make_node("Identity", [first], [name]) for name in outputs]
    model = helper.make_model(helper.make_graph(nodes, "g", graph_inputs, graph_outputs), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_wrong_interface_fails_at_load_naming_what_differs(tmp_path, test_model_paths):
    encoder, decoder = test_model_paths
    wrong_encoder = tmp_path / "encoder.onnx"
    _identity_model(wrong_encoder, {"img": [1, 3, 512, 512]}, {"img_out": [1, 3, 512, 512]})
    with pytest.raises(ModelInterfaceError, match="missing input 'image'.*missing output 'image_feats'"):
        SegNextEngine(wrong_encoder, decoder)

    small_feats = tmp_path / "encoder_small.onnx"
    _identity_model(small_feats, {"image": [1, 3, 1024, 1024]}, {"image_feats": [1, 256, 64, 64]})
    with pytest.raises(ModelInterfaceError, match=r"output 'image_feats' has shape .*expected \[1, 768, 64, 64\]"):
        SegNextEngine(small_feats, decoder)

    with pytest.raises(ModelInterfaceError, match="decoder|missing input 'point_coords'"):
        SegNextEngine(encoder, encoder)  # the encoder where the decoder should be


def test_truncated_or_missing_model_file_fails_clearly(tmp_path, test_model_paths):
    encoder, decoder = test_model_paths
    truncated = tmp_path / "decoder.onnx"
    truncated.write_bytes(decoder.read_bytes()[:200])
    with pytest.raises(ModelInterfaceError, match="could not be loaded"):
        SegNextEngine(encoder, truncated)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegNextEngine(tmp_path / "nope.onnx", decoder)


def test_test_models_are_flagged(spy):
    assert spy.is_test_model and all(info.is_test_model for info in spy.files.values())


def test_mask_work_waits_for_the_mask_pixel_budget_and_gives_it_back(spy):
    import gc

    scene = make_scene(400, 300)
    segmenter = segmenter_for(spy, {"img": scene}, mask_pixel_budget=400 * 300)
    first = segmenter.predict("img", clicks_on(scene, (0, True)), 400, 300)
    assert segmenter.mask_budget.in_use == 400 * 300  # held while the answer is built
    second_done = threading.Event()

    def second():
        segmenter.predict("img", clicks_on(scene, (1, True)), 400, 300).release()
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not second_done.wait(1.0)  # its mask waits for the first one's pixels
    first.release()
    assert second_done.wait(120)
    thread.join()
    assert segmenter.mask_budget.in_use == 0
    # Never released by hand: given back when the mask is garbage.
    dropped = segmenter.predict("img", clicks_on(scene, (2, True)), 400, 300)
    assert segmenter.mask_budget.in_use == 400 * 300
    del dropped
    gc.collect()
    assert segmenter.mask_budget.in_use == 0
