"""Tiny stand-in ONNX models with SegNext's exact ONNX interface.

Why these exist: the real SegNext encoder/decoder are large, slow on CPU and
their masks cannot be predicted by hand, so a test that runs them can only
check "some mask came out".  These two models keep SegNext's input/output
names, dtypes and shapes but compute something simple and exactly
reproducible ("colour region + previous mask"), so tests of the backend can
tell a right mask from a wrong one (wrong click order, x/y swapped, wrong
scaling, prev_mask not fed back, ...).  They are also small enough to build on
the fly, with ``onnx.helper`` only - no PyTorch, no downloads.  ``DEMO=true``
serves them (so they are part of the package), and the tests run on them.

They are NOT SegNext.  Both carry ``TEST_MODEL_METADATA_KEY = "true"`` in their
metadata so the server can warn loudly when it is serving them.

Behaviour:

* encoder: ``image`` [1,3,1024,1024] -> ``image_feats`` [1,768,64,64], a
  lossless reshape (3*1024*1024 == 768*64*64), so the decoder can get the
  image back.
* decoder: only the NEWEST click (the last point) and ``prev_mask`` matter,
  the same way SegNext builds a multi-click object by feeding back
  sigmoid(previous logits) as ``prev_mask``:

  1. unpack the image from ``image_feats``;
  2. clip the last point to [0, 1023], cast to int, read its colour c;
  3. region = pixels whose colour is within TOLERANCE of c in every channel;
  4. prev = prev_mask >= 0.5;
  5. label 1: prev OR region; label 0: prev AND NOT region; -1: prev;
  6. output logits +LOGIT where the mask is set, -LOGIT elsewhere.

Command line (from the repository root)::

    python -m segnext_backend.demo_models OUT_DIR
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TOLERANCE = 0.05
LOGIT = 8.0
TEST_MODEL_METADATA_KEY = "segnext_backend.test_model"

# SegNext's fixed frame: the backend resizes/pads every image to 1024x1024.
SIZE = 1024
FEAT_SHAPE = [1, 768, 64, 64]
IMAGE_SHAPE = [1, 3, SIZE, SIZE]

OPSET = 17
# IR 8 is the version that goes with opset 17; pinning it (instead of the
# newest IR the installed onnx package would write) keeps the files loadable
# by older onnxruntime releases too.
IR_VERSION = 8

_DOC = (
    "TEST MODEL, NOT SegNext: a tiny stand-in with SegNext's ONNX interface and "
    "predictable output ('colour region + previous mask'), built by "
    "segnext_backend/demo_models.py for tests and demo mode. Its masks are meaningless "
    "for real segmentation."
)

assert 3 * SIZE * SIZE == int(np.prod(FEAT_SHAPE)), "pack must be lossless"


def _const(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name=name)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="segnext_backend.demo_models",
        doc_string=_DOC,
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {TEST_MODEL_METADATA_KEY: "true"})
    # full_check runs strict shape inference, so a declared output shape that
    # the graph does not actually produce is caught here, not in a test.
    onnx.checker.check_model(model, full_check=True)
    return model


def make_encoder() -> onnx.ModelProto:
    """Encoder: pack the image into SegNext's feature shape, losslessly."""
    graph = helper.make_graph(
        nodes=[helper.make_node("Reshape", ["image", "feat_shape"], ["image_feats"])],
        name="segnext_test_encoder",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, IMAGE_SHAPE)],
        outputs=[helper.make_tensor_value_info("image_feats", TensorProto.FLOAT, FEAT_SHAPE)],
        initializer=[_const("feat_shape", FEAT_SHAPE, np.int64)],
        doc_string=_DOC,
    )
    return _finish(graph)


def make_decoder() -> onnx.ModelProto:
    """Decoder: colour region of the newest click, merged into prev_mask."""
    n = helper.make_node
    nodes = [
        # 1. Get the image back out of the features.
        n("Reshape", ["image_feats", "image_shape"], ["image"]),
        # 2. Newest click = last point.  A scalar index drops the points axis:
        #    [1, N, 2] -> [1, 2] and [1, N] -> [1].
        n("Gather", ["point_coords", "last"], ["click_xy_f"], axis=1),
        n("Gather", ["point_labels", "last"], ["click_label"], axis=1),
        # Clip before the cast so out-of-frame clicks land on the border
        # instead of being an out-of-range Gather index.
        n("Clip", ["click_xy_f", "zero", "max_coord"], ["click_xy_clipped"]),
        n("Cast", ["click_xy_clipped"], ["click_xy_int"], to=TensorProto.INT64),
        n("Reshape", ["click_xy_int", "flat2"], ["click_xy"]),
        n("Gather", ["click_xy", "idx0"], ["click_x"], axis=0),  # [1]
        n("Gather", ["click_xy", "idx1"], ["click_y"], axis=0),  # [1]
        # Coordinates are (x, y) = (column, row): rows are axis 2, columns axis 3.
        # 1-element index tensors keep the axes, so c is [1, 3, 1, 1] and
        # broadcasts against the whole image below.
        n("Gather", ["image", "click_y"], ["click_row"], axis=2),
        n("Gather", ["click_row", "click_x"], ["click_colour"], axis=3),
        # 3. region: max over channels of |image - c| <= TOLERANCE.
        n("Sub", ["image", "click_colour"], ["diff"]),
        n("Abs", ["diff"], ["abs_diff"]),
        n("ReduceMax", ["abs_diff"], ["max_diff"], axes=[1], keepdims=1),
        n("LessOrEqual", ["max_diff", "tolerance"], ["region"]),
        # 4. prev_mask is a probability (sigmoid of the previous logits).
        n("GreaterOrEqual", ["prev_mask", "half"], ["prev"]),
        # 5. One formula for all labels: (prev OR (pos AND region))
        #    AND NOT (neg AND region).  Padding (-1) is neither pos nor neg,
        #    so it leaves prev unchanged.
        n("Equal", ["click_label", "one"], ["is_pos"]),
        n("Equal", ["click_label", "zero"], ["is_neg"]),
        n("And", ["is_pos", "region"], ["add"]),
        n("And", ["is_neg", "region"], ["remove"]),
        n("Or", ["prev", "add"], ["grown"]),
        n("Not", ["remove"], ["keep"]),
        n("And", ["grown", "keep"], ["m"]),
        # 6. Logits, not probabilities, like SegNext's decoder.
        n("Where", ["m", "pos_logit", "neg_logit"], ["mask"]),
    ]
    initializers = [
        _const("image_shape", IMAGE_SHAPE, np.int64),
        _const("last", -1, np.int64),  # Gather accepts negative indices
        _const("flat2", [2], np.int64),
        _const("idx0", [0], np.int64),
        _const("idx1", [1], np.int64),
        _const("zero", 0.0, np.float32),
        _const("one", 1.0, np.float32),
        _const("half", 0.5, np.float32),
        _const("max_coord", SIZE - 1, np.float32),
        _const("tolerance", TOLERANCE, np.float32),
        _const("pos_logit", LOGIT, np.float32),
        _const("neg_logit", -LOGIT, np.float32),
    ]
    graph = helper.make_graph(
        nodes=nodes,
        name="segnext_test_decoder",
        inputs=[
            helper.make_tensor_value_info("image_feats", TensorProto.FLOAT, FEAT_SHAPE),
            helper.make_tensor_value_info("point_coords", TensorProto.FLOAT, [1, "num_points", 2]),
            helper.make_tensor_value_info("point_labels", TensorProto.FLOAT, [1, "num_points"]),
            helper.make_tensor_value_info("prev_mask", TensorProto.FLOAT, [1, 1, SIZE, SIZE]),
        ],
        outputs=[helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, SIZE, SIZE])],
        initializer=initializers,
        doc_string=_DOC,
    )
    return _finish(graph)


def _save_atomic(model: onnx.ModelProto, path: Path) -> None:
    # Another process (a running server, a parallel test) may be loading this
    # file; write a temp file in the same directory and rename it over, so a
    # reader sees either the old file or the complete new one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; models are meant to be readable by
        # whoever runs the server (e.g. another user in a container).
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def build_demo_models(out_dir) -> tuple[Path, Path]:
    """Write ``encoder.onnx`` and ``decoder.onnx`` into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder_path = out / "encoder.onnx"
    decoder_path = out / "decoder.onnx"
    _save_atomic(make_encoder(), encoder_path)
    _save_atomic(make_decoder(), decoder_path)
    return encoder_path, decoder_path


def reference_decode(
    image_1024: np.ndarray,
    point_coords: np.ndarray,
    point_labels: np.ndarray,
    prev_mask: np.ndarray,
) -> np.ndarray:
    """Plain numpy version of the test decoder, for checking it in tests.

    image_1024: (3, 1024, 1024) RGB in [0, 1]; point_coords: (N, 2) as (x, y)
    in the 1024 frame; point_labels: (N,); prev_mask: (1024, 1024)
    probabilities.  Returns (1024, 1024) float32 logits.
    """
    image = np.asarray(image_1024, dtype=np.float32).reshape(3, SIZE, SIZE)
    coords = np.asarray(point_coords, dtype=np.float32).reshape(-1, 2)
    labels = np.asarray(point_labels, dtype=np.float32).reshape(-1)
    prev = np.asarray(prev_mask, dtype=np.float32).reshape(SIZE, SIZE) >= np.float32(0.5)

    # Same order as the graph: clip in float, then truncate to int.
    x, y = np.clip(coords[-1], 0, SIZE - 1).astype(np.int64)
    colour = image[:, y, x]
    # float32 throughout (np.float32 tolerance) so the comparison rounds
    # exactly like onnxruntime's and the two agree bit for bit.
    region = np.abs(image - colour[:, None, None]).max(axis=0) <= np.float32(TOLERANCE)

    label = labels[-1]
    if label == 1:
        m = prev | region
    elif label == 0:
        m = prev & ~region
    else:  # padding
        m = prev
    return np.where(m, np.float32(LOGIT), np.float32(-LOGIT)).astype(np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m segnext_backend.demo_models",
        description="Build tiny TEST stand-ins (not SegNext) for encoder.onnx and decoder.onnx.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write encoder.onnx and decoder.onnx into")
    args = parser.parse_args(argv)
    for path in build_demo_models(args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
