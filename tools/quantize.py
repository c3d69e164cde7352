"""Faster CPU variants of a SegNext encoder/decoder pair, and how they compare with float32.

    python -m tools.quantize MODEL_DIR --out OUT_DIR                       # the recommended recipe
    python -m tools.quantize MODEL_DIR --out OUT_DIR --recipe fused-attention
    python -m tools.quantize MODEL_DIR --out OUT_DIR --compare             # then times and compares both pairs
    python -m tools.quantize OUT_DIR --peak-memory                         # peak RSS of serving one pair

Writes OUT_DIR/encoder.onnx and OUT_DIR/decoder.onnx with SegNext's interface (float32 inputs and outputs),
ready to serve: point MODEL_DIR at OUT_DIR. Nothing here is on by default: the backend serves whatever pair
MODEL_DIR holds, float32 unless you put a variant there. Recipes (`--recipe`):

- `fused-attention`: every attention (Q.K^T, softmax, .V) becomes ONNX Runtime's MultiHeadAttention
  kernel, which never writes the 12 x 4096 x 4096 score matrix of a global attention (flash attention on the
  CPU). Exact up to float rounding; no calibration.
- `int8`: static int8 (QDQ): weights of MatMul, Conv and ConvTranspose int8 per output channel, activations
  uint8 with ranges calibrated on representative inputs; the attention products (Q.K^T and softmax.V) are
  MatMuls between activations and are quantised too. Transposed convolutions whose kernel equals their
  stride are first rewritten, exactly, as a 1x1 Conv + DepthToSpace (ONNX Runtime has no int8
  ConvTranspose). Kept float32: the embeddings (the first Conv after an input), the last Conv before an
  output (the decoder's logits), and every node that reads an
  activation whose calibrated peak is more than 40x its RMS (one uint8 scale cannot hold both).
- `int8+fused-attention`: attention fused (float32, flash), everything else as `int8`.
- `int8-dynamic`: the earlier recipe: MatMul/Gemm weights int8, activations quantised per run, no
  calibration.

Calibration (the static recipes) runs the float32 pair on `--calibration-images` (a folder of images; by
default photo-like synthetic ones) with a simulated click session per image: the encoder is calibrated on
the images, the decoder on their features, clicks and the previous mask the float32 decoder produced, so
its ranges are those of real clicks. Choose images like the ones you will annotate.

--compare times the float32 pair (MODEL_DIR) and the variant (OUT_DIR) side by side in one process, runs
alternating (A B A B), and compares masks per click (IoU against float32) over click sessions on images
other than the calibration ones. On random weights that agreement says little about SegNext's real
accuracy: rerun it, and an evaluation of NoC/mIoU, on the real model files before serving a variant.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECIPES = ("int8+fused-attention", "int8", "fused-attention", "int8-dynamic")
DEFAULT_RECIPE = "int8+fused-attention"
ROLES = ("encoder", "decoder")
STATIC_OP_TYPES = ["MatMul", "Conv", "ConvTranspose"]
DYNAMIC_OP_TYPES = ["MatMul", "Gemm"]
MSFT_DOMAIN = "com.microsoft"
OUTLIER_PEAK_TO_RMS = 40.0  # see outlier_readers
CALIBRATION_CLICKS = 3  # clicks per calibration image for the decoder
FIRST_EVAL_SEED = 1000  # evaluation images never share a seed with the calibration ones


# -- attention fusion -------------------------------------------------------------------------------------------


def _constant_values(graph) -> dict:
    """Tensor name -> numpy value, for initializers and Constant nodes."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _scalar(values: dict, name: str) -> float | None:
    value = values.get(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _drop_unused_constants(graph) -> None:
    """Remove initializers and Constant nodes that no node reads any more."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    nodes = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fuse_attention(model):
    """Replace every `softmax(scale * Q @ K^T) @ V` on (B, heads, S, head_size) tensors by MultiHeadAttention.

    Works on the graph as an exporter writes it, whatever produced Q, K and V: the pattern is anchored on the
    Softmax (last axis) between two MatMuls, K^T must be a Transpose swapping the last two axes, and the scale
    a scalar Mul or Div on Q or on the scores. Q, K and V are brought to (B, S, heads * head_size) and the
    output back to (B, heads, S, head_size), so everything around the attention is unchanged. Returns the
    number of attentions fused.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
    values = _constant_values(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str):
        users = consumers.get(name, [])
        graph_outputs = {o.name for o in graph.output}
        return users[0] if len(users) == 1 and name not in graph_outputs else None

    def scaled(name: str) -> tuple[str, float, object | None]:
        """(tensor before a scalar Mul/Div, the scale, that node) or (name, 1.0, None)."""
        node = producer.get(name)
        if node is not None and node.op_type in ("Mul", "Div") and only_consumer(name) is not None:
            for i, other in ((0, 1), (1, 0)):
                factor = _scalar(values, node.input[other])
                if factor is not None and (node.op_type == "Mul" or other == 1):
                    return node.input[i], factor if node.op_type == "Mul" else 1.0 / factor, node
        return name, 1.0, None

    removed, added, fused = set(), [], 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        rank = len(shapes.get(softmax.input[0], []))
        if rank != 4 or axis not in (-1, 3):
            continue
        scores, score_scale, score_scaler = scaled(softmax.input[0])
        qk = producer.get(scores)
        pv = only_consumer(softmax.output[0])
        if qk is None or qk.op_type != "MatMul" or pv is None or pv.op_type != "MatMul" or pv.input[0] != softmax.output[0]:
            continue
        if score_scaler is not None and only_consumer(scores) is None:
            continue
        key_t = producer.get(qk.input[1])
        perm = next((list(a.ints) for a in key_t.attribute if a.name == "perm"), None) if key_t is not None else None
        if key_t is None or key_t.op_type != "Transpose" or perm != [0, 1, 3, 2] or only_consumer(qk.input[1]) is None:
            continue
        query, query_scale, query_scaler = scaled(qk.input[0])
        key, value = key_t.input[0], pv.input[1]
        q_shape, k_shape, v_shape = shapes.get(query), shapes.get(key), shapes.get(value)
        if not all(s and len(s) == 4 and all(d for d in s) for s in (q_shape, k_shape, v_shape)):
            continue
        heads = q_shape[1]
        tag = pv.name or pv.output[0]
        nodes = []
        bsd = {}
        for role, tensor in (("query", query), ("key", key), ("value", value)):
            transposed, flat = f"{tag}/fused_{role}_bsnh", f"{tag}/fused_{role}_bsd"
            nodes.append(helper.make_node("Transpose", [tensor], [transposed], perm=[0, 2, 1, 3]))
            nodes.append(helper.make_node("Reshape", [transposed, f"{tag}/fused_flat_shape"], [flat]))
            bsd[role] = flat
        attended = f"{tag}/fused_attention_bsd"
        nodes.append(
            helper.make_node(
                "MultiHeadAttention",
                [bsd["query"], bsd["key"], bsd["value"]],
                [attended],
                domain=MSFT_DOMAIN,
                num_heads=heads,
                scale=query_scale * score_scale,
            )
        )
        # ONNX's shape inference does not know com.microsoft ops: declare the output, so that the tensors after
        # it keep their types and shapes (the quantiser only calibrates tensors whose type it knows).
        graph.value_info.append(
            helper.make_tensor_value_info(attended, onnx.TensorProto.FLOAT, [q_shape[0], q_shape[2], heads * v_shape[3]])
        )
        nodes.append(helper.make_node("Reshape", [attended, f"{tag}/fused_split_shape"], [f"{tag}/fused_bsnh"]))
        nodes.append(helper.make_node("Transpose", [f"{tag}/fused_bsnh"], [pv.output[0]], perm=[0, 2, 1, 3]))
        graph.initializer.extend(
            [
                onnx.numpy_helper.from_array(np.array([0, 0, -1], np.int64), f"{tag}/fused_flat_shape"),
                onnx.numpy_helper.from_array(np.array([0, 0, heads, -1], np.int64), f"{tag}/fused_split_shape"),
            ]
        )
        for old in (softmax, qk, pv, key_t, score_scaler, query_scaler):
            if old is not None:
                removed.add(id(old))
        added.append((pv, nodes))
        fused += 1
    if not fused:
        return 0
    # Keep the graph topologically sorted: the new nodes go where the second MatMul was.
    replacement = {id(pv): nodes for pv, nodes in added}
    new_nodes = []
    for node in graph.node:
        if id(node) in replacement:
            new_nodes.extend(replacement[id(node)])
        elif id(node) not in removed:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_constants(graph)  # the scale constants went with their Mul
    if not any(opset.domain == MSFT_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MSFT_DOMAIN, 1))
    return fused


# -- calibration inputs -----------------------------------------------------------------------------------------


def calibration_images(folder: Path | None, count: int, first_seed: int = 0) -> list[np.ndarray]:
    """Model inputs (1x3x1024x1024 in [0, 1]) from a folder of images, or photo-like synthetic ones."""
    from segnext_backend.geometry import to_model_input
    from tools.benchmark import natural_image

    if folder is None:
        return [to_model_input(natural_image(1024, 1024, seed=first_seed + i)) for i in range(count)]
    from PIL import Image

    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".bmp", ".webp"})
    if not paths:
        raise SystemExit(f"no images (.jpg, .png, .bmp, .webp) in {folder}")
    return [to_model_input(np.asarray(Image.open(p).convert("RGB"))) for p in paths[:count]]


def click_session(model_input_seed: int, clicks: int) -> tuple[np.ndarray, np.ndarray]:
    """Click positions (1024 frame) and labels: mostly positive, every third negative, as an annotator refines."""
    rng = np.random.default_rng(model_input_seed)
    points = rng.uniform(100, 924, size=(clicks, 2)).round().astype(np.float32)
    labels = (np.arange(clicks) % 3 != 2).astype(np.float32)
    return points, labels


def _decoder_feeds(features: np.ndarray, points, labels, prev_mask: np.ndarray) -> dict:
    return {
        "image_feats": features,
        "point_coords": points[None].astype(np.float32),
        "point_labels": labels[None].astype(np.float32),
        "prev_mask": prev_mask[None, None].astype(np.float32),
    }


def calibration_feeds(model_dir: Path, images: list[np.ndarray], threads: int = 0) -> tuple[list[dict], list[dict]]:
    """Encoder feeds (the images) and decoder feeds (features, a click session, the float32 previous mask)."""
    import onnxruntime as ort

    from segnext_backend.masks import sigmoid

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    encoder = ort.InferenceSession(str(model_dir / "encoder.onnx"), options, providers=["CPUExecutionProvider"])
    all_features = [encoder.run(None, {"image": image})[0] for image in images]
    del encoder
    decoder = ort.InferenceSession(str(model_dir / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    decoder_feeds = []
    for index, features in enumerate(all_features):
        points, labels = click_session(index, CALIBRATION_CLICKS)
        prev = np.zeros((1024, 1024), np.float32)
        for k in range(1, CALIBRATION_CLICKS + 1):
            feeds = _decoder_feeds(features, points[:k], labels[:k], prev)
            decoder_feeds.append(feeds)
            prev = sigmoid(decoder.run(None, feeds)[0][0, 0])
    return [{"image": image} for image in images], decoder_feeds


# -- recipes ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _written_atomically(target: Path):
    """Yield a temporary path beside `target`, renamed to it on success: no reader sees half a model."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        yield tmp
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save(model, target: Path) -> None:
    import onnx

    with _written_atomically(target) as tmp:
        onnx.save_model(model, str(tmp))


def fold_identity_initializers(model) -> int:
    """Give every `Identity(initializer)` output its own initializer and drop the Identity.

    The TorchScript exporter shares equal constants (zero biases, unit norms) through Identity nodes; the
    quantiser only quantises a bias that is an initializer, and a Conv whose bias stays float cannot become an
    int8 Conv. Returns the number of Identity nodes folded.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    folded = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] not in {o.name for o in graph.output}:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(initializers[node.input[0]]), node.output[0]))
            folded.append(node)
    for node in folded:
        graph.node.remove(node)
    return len(folded)


def patchify_conv_transposes(model) -> int:
    """Rewrite every ConvTranspose whose kernel equals its stride as a 1x1 Conv followed by DepthToSpace.

    Such a transposed convolution (SegNext's neck upsamples this way) writes each output pixel from one input
    pixel: output[o, 2i+di, 2j+dj] = sum_c x[c, i, j] W[c, o, di, dj] + b[o], which is a 1x1 convolution to
    o x 2 x 2 channels rearranged by DepthToSpace (CRD). Exact; ONNX Runtime has an int8 kernel for Conv
    but not for ConvTranspose. Returns the number of nodes rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    rewritten = 0
    new_nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = initializers.get(node.input[1]) if node.op_type == "ConvTranspose" and len(node.input) > 1 else None
        if weight is None or len(weight.dims) != 4:
            new_nodes.append(node)
            continue
        kernel = list(attrs.get("kernel_shape", weight.dims[2:]))
        stride = list(attrs.get("strides", [1, 1]))
        plain = (
            kernel == stride == [kernel[0]] * 2
            and attrs.get("group", 1) == 1
            and not any(attrs.get("pads", [0])) and not any(attrs.get("output_padding", [0]))
            and all(d == 1 for d in attrs.get("dilations", [1, 1]))
            and "output_shape" not in attrs and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        )
        if not plain:
            new_nodes.append(node)
            continue
        block = kernel[0]
        w = numpy_helper.to_array(weight)  # (C_in, C_out, k, k)
        c_in, c_out = w.shape[:2]
        tag = node.name or node.output[0]
        conv_weight = numpy_helper.from_array(
            np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(c_out * block * block, c_in, 1, 1)), f"{tag}/as_conv_weight"
        )
        inputs = [node.input[0], conv_weight.name]
        graph.initializer.append(conv_weight)
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(initializers[node.input[2]])
            graph.initializer.append(numpy_helper.from_array(np.repeat(bias, block * block), f"{tag}/as_conv_bias"))
            inputs.append(f"{tag}/as_conv_bias")
        new_nodes.append(helper.make_node("Conv", inputs, [f"{tag}/as_conv"], name=f"{tag}/as_conv", kernel_shape=[1, 1]))
        new_nodes.append(helper.make_node("DepthToSpace", [f"{tag}/as_conv"], [node.output[0]], blocksize=block, mode="CRD"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_constants(graph)  # the transposed weights
    return rewritten


def _tensors_to_calibrate(model) -> dict[str, int]:
    """Float activations read or written by the ops to quantise, in graph order -> their size in bytes (0: unknown)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    infos = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    initializers = {init.name for init in model.graph.initializer}
    tensors: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in STATIC_OP_TYPES:
            continue
        for name in list(node.input) + list(node.output):
            info = infos.get(name)
            if name in initializers or name in tensors or info is None:
                continue
            if info.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                continue
            dims = [d.dim_value if d.HasField("dim_value") else 0 for d in info.type.tensor_type.shape.dim]
            tensors[name] = int(np.prod(dims)) * 4
    return tensors


def calibrate_ranges(model_path: Path, feeds: list[dict], chunk_bytes: int = 1 << 30, threads: int = 0):
    """Min/max of every tensor the quantiser needs, over `feeds`, measured a few tensors at a time; and each
    tensor's largest peak-to-RMS ratio (max |x| / sqrt(mean x^2)) over the feeds.

    ONNX Runtime's own calibrator adds a ReduceMin/ReduceMax pair for every tensor to one graph; on SegNext the
    global attentions' 12 x 4096 x 4096 score and probability maps (805 MB each) then stay alive together and
    the encoder's calibration passed 12 GB. Here each pass reduces only tensors totalling at most
    `chunk_bytes` (one big map per pass), so memory stays that of one ordinary run plus one chunk.
    """
    import onnx
    import onnxruntime as ort
    from onnx import helper
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    model = onnx.load(str(model_path))
    tensors = _tensors_to_calibrate(model)
    chunks, current, current_bytes = [], [], 0
    for name, size in tensors.items():
        if current and current_bytes + size > chunk_bytes:
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        chunks.append(current)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as named
    options.enable_cpu_mem_arena = False  # each pass's peak goes back to the system before the next
    original_outputs = list(model.graph.output)
    node_count = len(model.graph.node)
    ranges: dict[str, list[float]] = {}
    peak_to_rms: dict[str, float] = {}
    for chunk in chunks:
        # The reduce nodes are added to the model itself and removed after the pass: no second copy of the weights.
        outputs = []
        for name in chunk:
            for op in ("ReduceMin", "ReduceMax", "ReduceSumSquare"):
                out = f"{name}/calibration_{op}"
                model.graph.node.append(helper.make_node(op, [name], [out], keepdims=0))
                outputs.append(out)
        del model.graph.output[:]
        model.graph.output.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, []) for o in outputs)
        serialized = model.SerializeToString()
        session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        del serialized
        del model.graph.node[node_count:]
        del model.graph.output[:]
        model.graph.output.extend(original_outputs)
        for feed in feeds:
            values = session.run(outputs, feed)
            for name, low, high, sum_square in zip(chunk, values[0::3], values[1::3], values[2::3]):
                seen = ranges.setdefault(name, [float(low), float(high)])
                seen[0], seen[1] = min(seen[0], float(low)), max(seen[1], float(high))
                if tensors[name] and sum_square > 0:
                    rms = float(np.sqrt(float(sum_square) / (tensors[name] // 4)))
                    ratio = max(abs(float(low)), abs(float(high))) / rms
                    peak_to_rms[name] = max(peak_to_rms.get(name, 0.0), ratio)
        del session
    data = {
        name: TensorData(lowest=np.array([low], np.float32), highest=np.array([high], np.float32))
        for name, (low, high) in ranges.items()
    }
    return TensorsData(CalibrationMethod.MinMax, data), peak_to_rms


def outlier_readers(model, peak_to_rms: dict[str, float], limit: float = OUTLIER_PEAK_TO_RMS) -> list[str]:
    """Names of the quantisable nodes that read an activation whose peak is more than `limit` times its RMS.

    One uint8 scale per tensor spans the peak: with a peak 100x the RMS, typical values get 1-3 of the 256
    steps. SegNext's neck reads the transformer's residual stream, where a few tokens (a click's, or a
    ViT's known massive activations) dwarf the rest; such nodes stay float32.
    """
    outliers = {name for name, ratio in peak_to_rms.items() if ratio > limit}
    constants = {init.name for init in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type in STATIC_OP_TYPES and any(n in outliers and n not in constants for n in node.input)
    ]


def edge_nodes(model) -> list[str]:
    """Names of the quantisable nodes next to the graph's inputs or outputs: they stay float32.

    First: the Convs that read an input with no MatMul or Conv on the way (the embeddings). The decoder's
    prompt embedding mixes channels of very different scales (the previous mask's probability beside the
    click disks), which one int8 scale per output channel cannot hold; the encoder's reads raw pixels.
    Last: the Convs whose output reaches a graph output with no MatMul or Conv on the way (the decoder's final
    1x1 conv writes the logits, whose sign is the mask). Together ~2 % of the work.
    """
    constants = {init.name for init in model.graph.initializer}
    raw = {i.name for i in model.graph.input}  # tensors computed from the inputs by no MatMul or Conv
    found = []
    for node in model.graph.node:  # graph order is topological
        data = [name for name in node.input if name and name not in constants]
        if node.op_type == "Conv" and node.input[0] in raw:
            found.append(node.name)
        elif node.op_type not in STATIC_OP_TYPES and all(name in raw for name in data):
            raw.update(node.output)
    final = {o.name for o in model.graph.output}  # tensors that reach an output through no MatMul or Conv
    for node in reversed(model.graph.node):
        if any(name in final for name in node.output):
            if node.op_type == "Conv":
                found.append(node.name)
            elif node.op_type not in STATIC_OP_TYPES:
                final.update(name for name in node.input if name not in constants)
    return list(dict.fromkeys(found))


def _quantize_static(source: Path, target: Path, feeds: list[dict], scratch: Path, threads: int = 0, log=print) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    import onnx

    graph_only = onnx.load(str(source), load_external_data=False)
    ranges, peak_to_rms = calibrate_ranges(source, feeds, threads=threads)
    kept_float = list(dict.fromkeys(edge_nodes(graph_only) + outlier_readers(graph_only, peak_to_rms)))
    log(f"{target.stem}: kept float32: {', '.join(kept_float) or 'nothing'}; highest peak/RMS: "
        + ", ".join(f"{name} {ratio:.0f}" for name, ratio in sorted(peak_to_rms.items(), key=lambda kv: -kv[1])[:4]))
    ranges_path = scratch / f"{target.stem}.ranges.json"
    save_tensors_data(ranges, ranges_path)
    with _written_atomically(target) as tmp:
        quantize_static(
            str(source),
            str(tmp),
            None,  # the ranges come from the file calibrate_ranges wrote
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=STATIC_OP_TYPES,
            per_channel=True,
            # uint8 activations x int8 weights: the combination the x86 VNNI kernels run fastest.
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=kept_float,
            calibration_cache_path=ranges_path,
        )


def _quantize_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _written_atomically(target) as tmp:
        quantize_dynamic(str(source), str(tmp), op_types_to_quantize=DYNAMIC_OP_TYPES, weight_type=QuantType.QInt8)


def build_variant(
    model_dir: Path,
    out_dir: Path,
    recipe: str = DEFAULT_RECIPE,
    images_dir: Path | None = None,
    calibration_count: int = 2,
    threads: int = 0,
    log=print,
) -> tuple[Path, Path]:
    """Write OUT_DIR/encoder.onnx and OUT_DIR/decoder.onnx made from MODEL_DIR's float32 pair by `recipe`."""
    import onnx

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError("--out must be another folder than MODEL_DIR: the float32 pair is the calibration source")
    out_dir.mkdir(parents=True, exist_ok=True)
    fuse, static = "fused-attention" in recipe, recipe.startswith("int8") and recipe != "int8-dynamic"
    feeds = {}
    if static:
        started = time.perf_counter()
        images = calibration_images(images_dir, calibration_count)
        feeds["encoder"], feeds["decoder"] = calibration_feeds(model_dir, images, threads)
        log(f"calibration inputs: {len(feeds['encoder'])} images, {len(feeds['decoder'])} clicks "
            f"({time.perf_counter() - started:.0f} s)")
    with tempfile.TemporaryDirectory(prefix="segnext-quantize-", dir=out_dir) as scratch:
        for role in ROLES:
            started = time.perf_counter()
            source, target = model_dir / f"{role}.onnx", out_dir / f"{role}.onnx"
            if fuse or static:
                model = onnx.load(str(source))
                if fuse:
                    log(f"{role}: {fuse_attention(model)} attentions fused")
                if static:
                    fold_identity_initializers(model)  # before the rewrite: it needs the biases as initializers
                    patchify_conv_transposes(model)
                prepared = Path(scratch) / f"{role}.onnx"
                _save(model, prepared if static else target)
                del model
                source = prepared
            if static:
                _quantize_static(source, target, feeds[role], Path(scratch), threads, log)
            elif recipe == "int8-dynamic":
                _quantize_dynamic(source, target)
            log(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s)")
    return out_dir / "encoder.onnx", out_dir / "decoder.onnx"


# -- measuring --------------------------------------------------------------------------------------------------


def compare(model_dir: Path, variant_dir: Path, images: int = 3, clicks: int = 5, threads: int = 0) -> dict:
    """Time both pairs alternately and compare the variant's masks per click with float32's."""
    from segnext_backend.engine import SegNextEngine
    from segnext_backend.geometry import ModelFrame
    from segnext_backend.masks import logits_to_mask, sigmoid
    from tools.scenes import iou

    engines = {
        "float32": SegNextEngine(model_dir / "encoder.onnx", model_dir / "decoder.onnx", intra_op_threads=threads),
        "variant": SegNextEngine(variant_dir / "encoder.onnx", variant_dir / "decoder.onnx", intra_op_threads=threads),
    }
    frame = ModelFrame(1024, 1024)
    times = {name: {"encoder": [], "decoder": []} for name in engines}
    ious, first_ious, fractions = [], [], []
    inputs = calibration_images(None, images, first_seed=FIRST_EVAL_SEED)
    for index, model_input in enumerate(inputs):
        points, labels = click_session(FIRST_EVAL_SEED + index, clicks)
        order = list(engines) if index % 2 == 0 else list(engines)[::-1]  # A B, then B A
        features = {}
        for name in order:
            started = time.perf_counter()
            features[name] = engines[name].encode(model_input)
            times[name]["encoder"].append(time.perf_counter() - started)
        prev = {name: np.zeros((1024, 1024), np.float32) for name in engines}
        for k in range(1, clicks + 1):
            masks = {}
            for name in order if k % 2 else order[::-1]:
                started = time.perf_counter()
                logits = engines[name].decode(features[name], points[:k], labels[:k], prev[name])
                times[name]["decoder"].append(time.perf_counter() - started)
                prev[name] = sigmoid(logits)  # each model refines its own previous answer, as in a session
                masks[name] = logits_to_mask(logits, frame, 0.49).mask
            ious.append(iou(masks["float32"], masks["variant"]))
            fractions.append(float(masks["float32"].mean()))
            if k == 1:
                first_ious.append(ious[-1])
    result = {
        role: {name: statistics.median(times[name][role]) for name in engines} for role in ROLES
    }
    for role in ROLES:
        pairs = [a / b for a, b in zip(times["float32"][role], times["variant"][role])]
        result[role]["ratio"] = statistics.median(pairs)
        result[role]["pairs"] = len(pairs)
    result["iou"] = {"median": statistics.median(ious), "mean": statistics.fmean(ious), "min": min(ious), "clicks": len(ious)}
    result["first_click_iou_median"] = statistics.median(first_ious)
    result["float32_mask_fraction_median"] = statistics.median(fractions)
    return result


def print_comparison(result: dict) -> None:
    print("| model | float32 (median) | variant (median) | speed-up (median of paired ratios) |")
    print("| --- | ---: | ---: | ---: |")
    for role in ROLES:
        r = result[role]
        print(f"| {role} | {r['float32'] * 1000:,.0f} ms | {r['variant'] * 1000:,.0f} ms | {r['ratio']:.2f} x ({r['pairs']} pairs) |")
    iou = result["iou"]
    print(
        f"\nmask IoU variant vs float32 over {iou['clicks']} clicks: median {iou['median']:.3f}, mean {iou['mean']:.3f}, "
        f"min {iou['min']:.3f}; first clicks median {result['first_click_iou_median']:.3f}; "
        f"float32 masks cover a median {result['float32_mask_fraction_median']:.0%} of the frame"
    )


def peak_memory(model_dir: Path, clicks: int = 3, threads: int = 0) -> float:
    """Peak RSS (MB) of this process after loading the pair, encoding one image and decoding `clicks` clicks."""
    from segnext_backend.engine import SegNextEngine
    from segnext_backend.masks import sigmoid

    engine = SegNextEngine(model_dir / "encoder.onnx", model_dir / "decoder.onnx", intra_op_threads=threads)
    features = engine.encode(calibration_images(None, 1, first_seed=FIRST_EVAL_SEED)[0])
    points, labels = click_session(FIRST_EVAL_SEED, clicks)
    prev = np.zeros((1024, 1024), np.float32)
    for k in range(1, clicks + 1):
        prev = sigmoid(engine.decode(features, points[:k], labels[:k], prev))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="folder with the float32 encoder.onnx and decoder.onnx")
    parser.add_argument("--out", type=Path, help="folder to write the variant's encoder.onnx and decoder.onnx to")
    parser.add_argument("--recipe", choices=RECIPES, default=DEFAULT_RECIPE)
    parser.add_argument("--calibration-images", type=Path, help="folder of representative images (default: synthetic)")
    parser.add_argument("--calibration-count", type=int, default=2, help="images to calibrate on (3 clicks each)")
    parser.add_argument("--compare", action="store_true", help="then time float32 vs the variant and compare masks")
    parser.add_argument("--skip-build", action="store_true", help="with --compare: OUT_DIR already holds the variant")
    parser.add_argument("--images", type=int, default=3, help="--compare: evaluation images")
    parser.add_argument("--clicks", type=int, default=5, help="--compare: clicks per image")
    parser.add_argument("--peak-memory", action="store_true", help="print the peak RSS of serving MODEL_DIR's pair")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    for role in ROLES:
        if not (args.model_dir / f"{role}.onnx").is_file():
            parser.error(f"{args.model_dir} has no {role}.onnx")
    if args.peak_memory:
        print(f"peak RSS serving {args.model_dir}: {peak_memory(args.model_dir, threads=args.threads):,.0f} MB")
        return 0
    if args.out is None:
        parser.error("--out OUT_DIR is required")
    if not args.skip_build:
        build_variant(args.model_dir, args.out, args.recipe, args.calibration_images, args.calibration_count, args.threads)
    if args.compare:
        print_comparison(compare(args.model_dir, args.out, args.images, args.clicks, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
