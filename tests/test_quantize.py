"""tools/quantize.py and tools/onnx_rewrites.py: the faster CPU variants keep SegNext's interface, the exact
rewrites keep its answers, and the int8 safeguards (calibration, per-pixel scaling, float32 edges) do what
they claim."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnext_backend.engine import DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS  # noqa: E402
from segnext_backend.engine import SegNextEngine, check_interface  # noqa: E402
from segnext_backend.geometry import MODEL_SIZE  # noqa: E402


def _logits(encoder: Path, decoder: Path, image: np.ndarray, clicks=((500.0, 400.0, 1.0), (300.0, 650.0, 0.0))):
    engine = SegNextEngine(encoder, decoder, intra_op_threads=1)
    points = np.array([c[:2] for c in clicks], np.float32)
    labels = np.array([c[2] for c in clicks], np.float32)
    return engine.decode(engine.encode(image), points, labels, np.zeros((MODEL_SIZE, MODEL_SIZE), np.float32))


def _op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


@pytest.mark.parametrize("recipe", ["fused-attention", "exact"])
def test_fused_attention_gives_the_same_logits_without_the_score_matrix(shallow_models, tmp_path, recipe):
    import onnx

    from tools.quantize import main

    encoder, decoder = shallow_models
    assert main([str(encoder.parent), "--out", str(tmp_path), "--recipe", recipe]) == 0
    head_concat = any(node.name == "/head/Concat_3" for node in onnx.load(str(tmp_path / "decoder.onnx")).graph.node)
    assert head_concat == (recipe == "fused-attention")  # `exact` distributes the head's fusion conv
    for role, path, attentions in (("encoder", tmp_path / "encoder.onnx", 2), ("decoder", tmp_path / "decoder.onnx", 1)):
        ops = _op_types(path)
        assert "Softmax" not in ops, role  # every attention was fused: none computes its scores apart
        graph = onnx.load(str(path)).graph
        assert sum(node.op_type == "MultiHeadAttention" for node in graph.node) == attentions, role
    image = np.random.default_rng(0).random((1, 3, MODEL_SIZE, MODEL_SIZE), dtype=np.float32)
    expected = _logits(encoder, decoder, image)
    got = _logits(tmp_path / "encoder.onnx", tmp_path / "decoder.onnx", image)
    np.testing.assert_allclose(got, expected, atol=1e-4 * float(np.abs(expected).max()))


def test_quantize_command_writes_a_servable_pair_with_segnext_interface(shallow_models, tmp_path, monkeypatch, caplog):
    """`python -m tools.quantize MODEL_DIR --out OUT_DIR --recipe int8+fused-attention` (static int8 + fused
    attention, the default on a CPU with VNNI)."""
    import subprocess

    encoder, decoder = shallow_models
    out = tmp_path / "faster"
    subprocess.run(
        [sys.executable, "-m", "tools.quantize", str(encoder.parent), "--out", str(out), "--calibration-count", "1",
         "--recipe", "int8+fused-attention"],
        cwd=Path(__file__).resolve().parents[1],
        check=True,
        timeout=900,
    )
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx"]  # no scratch files left
    encoder8, decoder8 = out / "encoder.onnx", out / "decoder.onnx"
    import onnxruntime as ort

    for path, inputs, outputs, source in (
        (encoder8, ENCODER_INPUTS, ENCODER_OUTPUTS, encoder),
        (decoder8, DECODER_INPUTS, DECODER_OUTPUTS, decoder),
    ):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        check_interface(session, str(path), inputs, outputs)
        ops = _op_types(path)
        assert {"QuantizeLinear", "DequantizeLinear", "MultiHeadAttention"} <= ops, ops
        assert path.stat().st_size < 0.5 * source.stat().st_size  # int8 weights
    # The prompt embedding (previous mask and click disks, scales far apart) keeps float32 weights.
    import onnx

    graph = onnx.load(str(decoder8)).graph
    prompt_conv = next(node for node in graph.node if node.name == "/visual_prompts_encoder/proj/Conv")
    assert prompt_conv.input[1] in {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    # The engine serves them (it checks the interface on load), with logits close to float32 on the same input.
    image = np.random.default_rng(0).random((1, 3, MODEL_SIZE, MODEL_SIZE), dtype=np.float32)
    logits32 = _logits(encoder, decoder, image)
    logits8 = _logits(encoder8, decoder8, image)
    assert logits8.shape == (MODEL_SIZE, MODEL_SIZE) and np.isfinite(logits8).all()
    assert np.corrcoef(logits32.ravel(), logits8.ravel())[0, 1] > 0.9
    # Made for this CPU (the default, --target-cpu auto): the engine says so, and that it is exact here.
    from segnext_backend.cpu import cpu_class, cpu_flags

    for role, info in SegNextEngine(encoder8, decoder8, intra_op_threads=1).files.items():
        assert info.int8["made_for"] == info.int8["this_cpu"] == cpu_class(cpu_flags()), role
        assert info.int8["exact_here"] is True, role
        assert info.int8["recipe"] == "int8+fused-attention", role  # /health says which recipe made it
    assert SegNextEngine(encoder, decoder, intra_op_threads=1).files["decoder"].int8 is None  # float32
    # Served on a CPU without VNNI, a pair with 8-bit weights is flagged in /health's fields and the log.
    import logging

    import segnext_backend.engine as engine_module

    monkeypatch.setattr(engine_module, "cpu_flags", lambda: {"avx2", "fma"})
    with caplog.at_level(logging.INFO, logger="segnext_backend.engine"):
        int8 = SegNextEngine(encoder8, decoder8, intra_op_threads=1).files["decoder"].int8
    assert int8["this_cpu"] == "avx2" and int8["exact_here"] == (int8["weight_bits"] == 7)
    flagged = [r for r in caplog.records if r.levelno == logging.WARNING and "saturate" in r.getMessage()]
    assert len(flagged) == (0 if int8["exact_here"] else 2), [r.getMessage() for r in caplog.records]
    # The neck's upsamplings rearrange uint8 values: the same scale in and out, so ONNX Runtime drops the pair.
    values = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    rearranged = [node for node in graph.node if node.op_type == "DepthToSpace"]
    assert len(rearranged) == 3
    for node in rearranged:
        before = producers[node.input[0]]
        after = [n for n in graph.node if node.output[0] in n.input and n.op_type == "QuantizeLinear"]
        assert before.op_type == "DequantizeLinear" and len(after) == 1, node.name
        assert values[before.input[1]] == values[after[0].input[1]], node.name
    # The logits stay float32 from the last conv to the output.
    assert producers[producers["mask"].input[0]].op_type == "Conv"


def test_conv_transposes_with_kernel_equal_to_stride_become_exact_int8able_convs(shallow_models):
    import onnx
    import onnxruntime as ort

    from tools.onnx_rewrites import fold_identity_initializers, patchify_conv_transposes

    _, decoder = shallow_models
    model = onnx.load(str(decoder))
    fold_identity_initializers(model)
    assert patchify_conv_transposes(model) == 3  # the neck's three 2x2 stride-2 upsamplings
    assert "ConvTranspose" not in {node.op_type for node in model.graph.node}
    rng = np.random.default_rng(1)
    feeds = {
        "image_feats": rng.standard_normal((1, 768, 64, 64), dtype=np.float32),
        "point_coords": np.array([[[500.0, 400.0]]], np.float32),
        "point_labels": np.array([[1.0]], np.float32),
        "prev_mask": rng.random((1, 1, MODEL_SIZE, MODEL_SIZE), dtype=np.float32),
    }
    expected = ort.InferenceSession(str(decoder), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5 * float(np.abs(expected).max()))


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def test_chunked_calibration_gives_onnx_runtimes_ranges(tmp_path):
    """calibrate_ranges (a few tensors per pass, to bound memory) against ONNX Runtime's own MinMax calibrator."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from tools.quantize import STATIC_OP_TYPES, calibrate_ranges

    rng = np.random.default_rng(2)
    weights = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3), dtype=np.float32), "conv_w"),
        numpy_helper.from_array(rng.standard_normal((4, 2, 2, 2), dtype=np.float32), "convt_w"),
        numpy_helper.from_array(rng.standard_normal((16, 16), dtype=np.float32), "fc_w"),
        numpy_helper.from_array(np.array([1, 2, 16], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("ConvTranspose", ["relu", "convt_w"], ["up"], strides=[2, 2]),
        helper.make_node("Reshape", ["up", "shape"], ["tokens"]),
        helper.make_node("MatMul", ["tokens", "fc_w"], ["fc"]),
        helper.make_node("Transpose", ["fc"], ["fc_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["fc", "fc_t"], ["y"]),  # a product of two activations, as attention's
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2])], initializer=weights,
    )
    path = tmp_path / "small.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), str(path))
    feeds = [{"x": rng.standard_normal((1, 3, 2, 2), dtype=np.float32) * scale} for scale in (1.0, 3.0, 0.5)]

    ours, _ = calibrate_ranges(path, feeds, chunk_bytes=64)  # 64 bytes: one or two tensors per pass
    calibrator = create_calibrator(
        path, STATIC_OP_TYPES, augmented_model_path=str(tmp_path / "augmented.onnx"), calibrate_method=CalibrationMethod.MinMax
    )
    calibrator.collect_data(_FeedReader(feeds))
    theirs = calibrator.compute_data()
    assert set(ours.keys()) == set(theirs.keys()) == {"x", "conv", "relu", "up", "tokens", "fc", "fc_t", "y"}
    for name in theirs.keys():
        np.testing.assert_allclose(np.ravel(ours[name].range_value), np.ravel(theirs[name].range_value), rtol=1e-6, err_msg=name)


def test_nodes_reading_a_tensor_dominated_by_a_few_huge_values_stay_float(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tools.quantize import calibrate_ranges, outlier_readers

    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8), dtype=np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["spiky", "w"], ["a"], name="reads_spiky"),
            helper.make_node("MatMul", ["plain", "w"], ["b"], name="reads_plain"),
        ],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4096, 8]) for n in ("spiky", "plain")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4096, 8]) for n in ("a", "b")],
        initializer=[weight],
    )
    path = tmp_path / "spiky.onnx"
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.save(model, str(path))
    spiky, plain = rng.standard_normal((2, 4096, 8), dtype=np.float32)
    spiky[5, 3] = 1000.0  # one value far above the rest, like a click's token in the residual stream
    _, peak_to_rms = calibrate_ranges(path, [{"spiky": spiky, "plain": plain}])
    assert peak_to_rms["spiky"] > 40 > 10 > peak_to_rms["plain"]
    assert outlier_readers(model, peak_to_rms) == ["reads_spiky"]


def test_the_embeddings_and_the_logits_conv_are_the_edge_nodes_kept_float(shallow_models):
    import onnx

    from tools.quantize import edge_nodes

    encoder, decoder = (onnx.load(str(path), load_external_data=False) for path in shallow_models)
    assert edge_nodes(encoder) == ["/backbone/patch_embed/proj/Conv"]
    edges = edge_nodes(decoder)
    # The prompt maps (previous mask and click disks), their embedding, the logits conv and the logits' Resize...
    assert {"/Concat_5", "/visual_prompts_encoder/proj/Conv", "/head/seg_conv/Conv", "/Resize"} <= set(edges), edges
    # ... and nothing between them: the rearranging ops there (the click rasterisation's) read the inputs.
    assert not [name for name in edges if name.startswith(("/fusion_blocks", "/neck", "/head/convs", "/head/fusion", "/head/Resize"))]


def test_quantize_refuses_to_overwrite_its_float32_source(shallow_models):
    from tools.quantize import main

    encoder, _ = shallow_models
    with pytest.raises(ValueError, match="another folder"):
        main([str(encoder.parent), "--out", str(encoder.parent), "--recipe", "fused-attention"])


def _tiny_model(nodes, inputs, outputs, initializers):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        initializer=initializers,
    )
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _run(model, feed):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def _spiky_token_model():
    """A residual stream with a few huge pixels (a stem Conv, kept float32 as an embedding, passes the input
    on unchanged) read by the three per-pixel ops the scaling handles: 1x1 Conv, 2x2 stride-2 Conv, 2x2
    stride-2 ConvTranspose."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(4)
    weights = {
        "stem_w": np.eye(16, dtype=np.float32).reshape(16, 16, 1, 1),
        "pointwise_w": rng.standard_normal((8, 16, 1, 1), dtype=np.float32),
        "pointwise_b": rng.standard_normal(8, dtype=np.float32),
        "patchify_w": rng.standard_normal((8, 16, 2, 2), dtype=np.float32),
        "upsample_w": rng.standard_normal((16, 4, 2, 2), dtype=np.float32),
        "upsample_b": rng.standard_normal(4, dtype=np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "stem_w"], ["stream"], name="stem"),
        helper.make_node("Conv", ["stream", "pointwise_w", "pointwise_b"], ["pointwise"], name="pointwise"),
        helper.make_node("Conv", ["stream", "patchify_w"], ["patchify"], name="patchify", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["stream", "upsample_w", "upsample_b"], ["upsample"], name="upsample", strides=[2, 2]),
    ]
    for name, channels in (("pointwise", 8), ("patchify", 8), ("upsample", 4)):
        # An identity Conv after each, as the float32 logits conv after SegNext's head: the readers are then
        # no edge of the graph, and the quantiser makes them int8.
        weights[f"{name}_tail_w"] = np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1)
        nodes.append(helper.make_node("Conv", [name, f"{name}_tail_w"], [f"{name}_out"], name=f"{name}_tail"))
    model = _tiny_model(
        nodes, [("x", [1, 16, 16, 16])], ["pointwise_out", "patchify_out", "upsample_out"],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )

    def feed(seed):
        x = np.random.default_rng(seed).standard_normal((1, 16, 16, 16), dtype=np.float32)
        x[0, :, 3, 5] *= 300.0  # two click-like tokens
        x[0, :, 12, 9] *= 200.0
        return {"x": x}

    return model, feed


def test_per_pixel_scaling_is_exact_in_float32():
    from tools.onnx_rewrites import scale_outlier_readers

    model, feed = _spiky_token_model()
    expected = _run(model, feed(0))
    assert sorted(scale_outlier_readers(model, {"stream"}, feed(0))) == ["patchify", "pointwise", "upsample"]
    assert {node.op_type for node in model.graph.node} >= {"ReduceMax", "MaxPool", "Div"}
    got = _run(model, feed(0))
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-4, err_msg=name)
    assert scale_outlier_readers(model, {"stream"}, feed(0), max_pixels=15 * 15) == []  # 16x16 is over the limit


@pytest.mark.parametrize("target_cpu", ["auto", "avx2"])
def test_per_pixel_scaling_keeps_the_quiet_pixels_of_a_spiky_tensor_in_int8(tmp_path, monkeypatch, target_cpu):
    """int8 with and without the scaling, against float32, on the pixels that are not spikes: made for this CPU
    (`auto`: 8-bit weights where it has VNNI, 7-bit where it has not) and for AVX2 (7-bit weights, exact on any
    x86 CPU). With 8-bit weights on a CPU without VNNI the scaled pixels' pair sums saturate (0.04 on AVX2)."""
    import onnx

    import tools.quantize as quantize

    model, feed = _spiky_token_model()
    calibration, evaluation = [feed(seed) for seed in range(3)], feed(10)
    expected = _run(model, evaluation)
    quiet = {"pointwise_out": (slice(None), slice(None), slice(0, 2)), "patchify_out": (slice(None), slice(None), slice(3, 5)),
             "upsample_out": (slice(None), slice(None), slice(0, 4))}  # rows far from both spikes

    def relative_errors(scale_limit: float) -> dict[str, float]:
        monkeypatch.setattr(quantize, "SCALE_PEAK_TO_RMS", scale_limit)
        target = tmp_path / f"limit{scale_limit}.onnx"
        quantize._quantize_static(
            onnx.load_model_from_string(model.SerializeToString()), target, calibration, tmp_path, False,
            log=lambda _: None, target_cpu=target_cpu,
        )
        got = _run(onnx.load(str(target)), evaluation)
        return {
            name: float(np.abs(got[name][rows] - expected[name][rows]).mean() / np.abs(expected[name][rows]).mean())
            for name, rows in quiet.items()
        }

    scaled, unscaled = relative_errors(quantize.SCALE_PEAK_TO_RMS), relative_errors(float("inf"))
    for name in quiet:
        assert scaled[name] < 0.03, (name, scaled, unscaled)
        assert unscaled[name] > 5 * scaled[name], (name, scaled, unscaled)


def test_calibration_measures_the_peaks_behind_a_reshape_shaped_at_run_time(tmp_path):
    """SegNext's GroupNorms reshape to shapes computed at run time, so shape inference cannot size the tensors
    after them; their peak-to-RMS ratios must be measured all the same."""
    import onnx
    from onnx import helper, numpy_helper

    from tools.quantize import _tensors_to_calibrate, calibrate_ranges

    rng = np.random.default_rng(6)
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "rest"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["tokens"]),
        helper.make_node("MatMul", ["tokens", "w"], ["y"], name="reads_tokens"),
    ]
    constants = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1, 8], np.int64), "rest"),
        numpy_helper.from_array(rng.standard_normal((8, 8), dtype=np.float32), "w"),
    ]
    model = _tiny_model(nodes, [("x", [1, 64, 64])], ["y"], constants)
    assert _tensors_to_calibrate(model)["tokens"] == 0  # the premise: its size is unknown before running
    path = tmp_path / "reshaped.onnx"
    onnx.save(model, str(path))
    x = rng.standard_normal((1, 64, 64), dtype=np.float32)
    x[0, 7, 9] = 500.0
    _, peak_to_rms = calibrate_ranges(path, [{"x": x}])
    assert peak_to_rms["tokens"] > 40


def test_distributing_the_heads_fusion_conv_over_its_concatenation_is_exact(shallow_models):
    import onnx

    from tools.onnx_rewrites import distribute_concat_convs, fold_identity_initializers
    from tools.quantize import _probe_feed

    _, decoder = shallow_models
    model = onnx.load(str(decoder))
    fold_identity_initializers(model)
    rng = np.random.default_rng(7)
    feed = {
        "image_feats": rng.standard_normal((1, 768, 64, 64), dtype=np.float32),
        "point_coords": np.array([[[500.0, 400.0], [200.0, 700.0]]], np.float32),
        "point_labels": np.array([[1.0, 0.0]], np.float32),
        "prev_mask": rng.random((1, 1, MODEL_SIZE, MODEL_SIZE), dtype=np.float32),
    }
    expected = _run(model, feed)["mask"]
    assert distribute_concat_convs(model, _probe_feed(model)) == 1  # the head's fusion conv
    names = {node.name for node in model.graph.node}
    assert "/head/Concat_3" not in names  # the 1024-channel concatenation is gone ...
    assert {f"/head/fusion_conv/conv/Conv/part{k}" for k in range(4)} <= names  # ... one conv per level instead
    resized = [node for node in model.graph.node if node.op_type == "Resize" and node.name.endswith("/resize")]
    assert len(resized) == 3  # the three upsampled levels' parts are upsampled after their convolution
    np.testing.assert_allclose(_run(model, feed)["mask"], expected, atol=1e-4 * float(np.abs(expected).max()))


def test_float32_outliers_builds_a_servable_pair_and_needs_a_static_recipe(shallow_models, tmp_path):
    from tools.quantize import build_variant

    encoder, decoder = shallow_models
    with pytest.raises(ValueError, match="static int8"):
        build_variant(encoder.parent, tmp_path / "no", "exact", float32_outliers=True)
    encoder8, decoder8 = build_variant(
        encoder.parent, tmp_path / "careful", calibration_count=1, float32_outliers=True, log=lambda _: None
    )
    image = np.random.default_rng(0).random((1, 3, MODEL_SIZE, MODEL_SIZE), dtype=np.float32)
    logits32, logits8 = _logits(encoder, decoder, image), _logits(encoder8, decoder8, image)
    assert np.corrcoef(logits32.ravel(), logits8.ravel())[0, 1] > 0.9


@pytest.mark.parametrize(
    "target_cpu, recipe",
    [("avx2", "int8-decoder"), ("avx512", "int8-decoder"), ("avx512-vnni", "int8+fused-attention"),
     ("avx512-bf16", "int8+fused-attention")],
)
def test_the_auto_recipe_is_int8_decoder_exactly_on_cpus_without_vnni(target_cpu, recipe):
    from tools.quantize import DEFAULT_RECIPE, resolve_recipe

    assert DEFAULT_RECIPE == "auto"
    chosen, why = resolve_recipe("auto", target_cpu)
    assert chosen == recipe and target_cpu in why
    assert resolve_recipe("int8+fused-attention", target_cpu) == ("int8+fused-attention", None)  # asked for: kept


def test_int8_decoder_keeps_the_encoder_exact_and_the_head_float32_for_masks_closer_to_float32(
    shallow_segnext, tmp_path
):
    """On a CPU without VNNI (7-bit weights, the same answers on every x86 CPU), `int8-decoder` quantises only
    the decoder, keeps its head float32, and its masks follow float32's more closely than int8+fused-attention's
    on the same clicks."""
    import json

    import onnx

    from segnext_backend.cpu import INT8_METADATA_KEY
    from tools.quantize import build_variant, compare

    _, encoder, _ = shallow_segnext
    logs = []
    close = build_variant(
        encoder.parent, tmp_path / "close", "auto", calibration_count=1, target_cpu="avx2", log=logs.append
    )
    assert any(line.startswith("recipe int8-decoder: avx2 CPUs have no VNNI") for line in logs), logs
    encoder_ops = _op_types(close[0])
    assert "MultiHeadAttention" in encoder_ops and not encoder_ops & {"QuantizeLinear", "DequantizeLinear"}
    decoder_model = onnx.load(str(close[1]))
    graph = decoder_model.graph
    floats = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    weighted = [node for node in graph.node if node.op_type in ("Conv", "MatMul") and len(node.input) > 1]
    head = [node for node in weighted if node.name.startswith("/head/")]
    blocks = [node for node in weighted if node.name.startswith("/fusion_blocks") and node.input[1] in dequantized]
    assert head and all(node.input[1] in floats for node in head), [node.name for node in head]
    assert len(blocks) == 4  # qkv, proj, fc1, fc2 of the one fusion block: int8 weights
    made_for = json.loads({prop.key: prop.value for prop in decoder_model.metadata_props}[INT8_METADATA_KEY])
    assert made_for == {"target_cpu": "avx2", "weight_bits": 7, "recipe": "int8-decoder"}
    build_variant(
        encoder.parent, tmp_path / "fast", "int8+fused-attention", calibration_count=1, target_cpu="avx2",
        log=lambda _: None,
    )
    close_iou = compare(encoder.parent, tmp_path / "close", images=2, clicks=3, threads=1, device="cpu")["iou"]
    fast_iou = compare(encoder.parent, tmp_path / "fast", images=2, clicks=3, threads=1, device="cpu")["iou"]
    assert close_iou["mean"] > fast_iou["mean"] and close_iou["min"] > fast_iou["min"], (close_iou, fast_iou)


def test_a_symlink_planted_at_a_temporary_name_is_never_written_through(shallow_models, tmp_path):
    # The files are written to unique, exclusively created temporary names beside their targets: a symlink
    # planted where a fixed temporary name would be is left alone, and so is the file it points to.
    import onnx

    from tools.quantize import main

    encoder, _ = shallow_models
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("not to be overwritten")
    planted = [out / f".{role}.onnx.tmp" for role in ("encoder", "decoder")]
    for link in planted:
        link.symlink_to(victim)
    assert main([str(encoder.parent), "--out", str(out), "--recipe", "int8-dynamic"]) == 0
    assert victim.read_text() == "not to be overwritten"
    assert all(link.is_symlink() for link in planted)
    for role in ("encoder", "decoder"):
        written = out / f"{role}.onnx"
        assert written.is_file() and not written.is_symlink()
        onnx.checker.check_model(str(written))
    names = sorted(p.name for p in out.iterdir())
    assert names == [".decoder.onnx.tmp", ".encoder.onnx.tmp", "decoder.onnx", "encoder.onnx"]  # nothing left behind


@pytest.mark.parametrize(
    "target_cpu, weight_bits", [("avx2", 7), ("avx512", 7), ("avx512-vnni", 8), ("avx512-bf16", 8)]
)
def test_int8_weights_use_7_bits_for_cpus_without_vnni_and_the_file_says_so(tmp_path, target_cpu, weight_bits):
    """uint8 x int8 products added in pairs into 16 bits (AVX2, AVX-512 without VNNI) saturate past 32,767:
    255 x 127 x 2 does, 255 x 64 x 2 does not. The file records the class and the bits, and the engine reads
    them: exact on a VNNI CPU whatever the bits, on another only with 7 bits."""
    import json

    import onnx

    import tools.quantize as quantize
    from segnext_backend.cpu import INT8_METADATA_KEY, int8_file_status

    model, feed = _spiky_token_model()
    target = tmp_path / "int8.onnx"
    quantize._quantize_static(model, target, [feed(0)], tmp_path, False, log=lambda _: None, target_cpu=target_cpu)
    written = onnx.load(str(target))
    dequantized = {node.input[0] for node in written.graph.node if node.op_type == "DequantizeLinear"}
    weights = [
        onnx.numpy_helper.to_array(init) for init in written.graph.initializer
        if init.name in dequantized and init.data_type == onnx.TensorProto.INT8
    ]
    assert len(weights) == 3  # the three readers of the stream
    largest = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)
    assert largest == (64 if weight_bits == 7 else 127)  # each output channel's largest weight takes the top step
    metadata = {prop.key: prop.value for prop in written.metadata_props}[INT8_METADATA_KEY]
    assert json.loads(metadata) == {"target_cpu": target_cpu, "weight_bits": weight_bits, "recipe": "int8+fused-attention"}
    without_vnni, with_vnni = {"avx2", "fma"}, {"avx2", "avx512bw", "avx512_vnni"}
    assert int8_file_status(metadata, with_vnni)["exact_here"]
    assert int8_file_status(metadata, without_vnni)["exact_here"] == (weight_bits == 7)
