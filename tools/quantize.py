"""Faster CPU variants of a SegNext encoder/decoder pair, and how they compare with float32.

    python -m tools.quantize MODEL_DIR --out OUT_DIR                       # the recipe for this CPU (auto)
    python -m tools.quantize MODEL_DIR --out OUT_DIR --float32-outliers    # closer masks, less speed
    python -m tools.quantize MODEL_DIR --out OUT_DIR --recipe exact        # float32, exact rewrites only
    python -m tools.quantize MODEL_DIR --out OUT_DIR --compare             # then times and compares both pairs
    python -m tools.quantize MODEL_DIR --compare --device openvino         # OpenVINO (bf16) on the same files
    python -m tools.quantize OUT_DIR --peak-memory                         # peak RSS of serving one pair
    python -m tools.quantize MODEL_DIR --out OUT_DIR --target-cpu avx2     # int8 for another CPU than this one

Writes OUT_DIR/encoder.onnx and OUT_DIR/decoder.onnx with SegNext's interface (float32 inputs and outputs),
ready to serve: point MODEL_DIR at OUT_DIR. Nothing here is on by default: the backend serves whatever pair
MODEL_DIR holds, float32 unless you put a variant there. Recipes (`--recipe`); the graph rewrites they use
are in tools/onnx_rewrites.py:

- `auto` (the default): `int8+fused-attention` for a CPU with VNNI, `int8-decoder` for one without (below).
- `int8+fused-attention`: every attention becomes ONNX Runtime's MultiHeadAttention kernel
  (float32; it never writes the 12 x 4096 x 4096 score matrix of a global attention), and everything else
  that carries weights is static int8 (QDQ): MatMul, Conv and ConvTranspose weights int8 per output channel,
  activations uint8 with ranges calibrated on representative inputs, and the Concat, Resize and
  DepthToSpace between them moving uint8. Transposed convolutions whose kernel equals their stride become,
  exactly, a 1x1 Conv + DepthToSpace (ONNX Runtime has no int8 ConvTranspose). Convolutions that read a
  tensor with a few huge pixels (peak over 10x its RMS; SegNext's neck reads the residual stream, where a
  click's tokens dwarf the rest) read it scaled per pixel, where it has at most 64x64 pixels. Kept float32:
  the embeddings, the logits conv and what lies between them and the graph's inputs and outputs.
- `int8+fused-attention --float32-outliers`: also keeps float32 every int8 candidate still reading a tensor
  whose peak is over 40x its RMS, and distributes the head's fusion conv over its concatenation (so that,
  float32, it costs a quarter). Masks closer to float32, less speed.
- `int8-decoder`: int8 where each click pays, the decoder, as `int8+fused-attention --float32-outliers` but
  with the head float32 too (the convolutions after the neck, which write the logits: where the int8 error
  moves the mask's edge most directly); the encoder, run once per image, gets the `exact` rewrites only. The
  masks closest to float32's of the int8 recipes, and the default on CPUs without VNNI, whose 7-bit weights
  cost agreement elsewhere (docs/performance.md).
- `exact`: only the rewrites that change nothing beyond float rounding: attention fused, the head's fusion
  conv distributed. No calibration.
- `fused-attention`: the attention fused, nothing else.
- `int8`: as the default but the attention unfused, its products (Q.K^T, softmax.V) int8 too.
- `int8-dynamic`: MatMul/Gemm weights int8, activations quantised per run, no calibration.

The CPU (`--target-cpu`, default `auto`: the one this runs on; segnext_backend/cpu.py): ONNX Runtime multiplies
uint8 activations by int8 weights, exactly (32-bit sums) on a CPU with VNNI, but on one without (AVX2, AVX-512
before Cascade Lake) with an instruction that adds pairs of products into 16 bits and saturates. For such a
CPU (`avx2`, `avx512`) the weights get 7 bits (ONNX Runtime's `reduce_range`), which never saturate and give
the same answers on every x86 CPU; for `avx512-vnni` and `avx512-bf16`, 8 bits. Each int8 file records the
class it was made for (metadata `segnext_backend.int8`), which the backend reports and checks at load.

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
import json
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

from segnext_backend.cpu import CPU_CLASSES  # noqa: E402
from segnext_backend.model_files import written_atomically  # noqa: E402
from tools.onnx_rewrites import (  # noqa: E402
    distribute_concat_convs,
    fold_identity_initializers,
    fuse_attention,
    patchify_conv_transposes,
    scale_outlier_readers,
)

RECIPES = ("auto", "int8+fused-attention", "int8-decoder", "exact", "fused-attention", "int8", "int8-dynamic")
DEFAULT_RECIPE = "auto"
STATIC_RECIPES = ("int8+fused-attention", "int8-decoder", "int8")
ROLES = ("encoder", "decoder")
WEIGHTED_OP_TYPES = ["MatMul", "Conv", "ConvTranspose"]
# Between two int8 nodes these move uint8 values instead of float32 ones: their calibrated output range is their
# input's, so the quantiser gives both the same scale and ONNX Runtime runs them on uint8.
REARRANGING_OP_TYPES = ["Concat", "Resize", "DepthToSpace"]
STATIC_OP_TYPES = WEIGHTED_OP_TYPES + REARRANGING_OP_TYPES
DYNAMIC_OP_TYPES = ["MatMul", "Gemm"]
OUTLIER_PEAK_TO_RMS = 40.0  # see outlier_readers
SCALE_PEAK_TO_RMS = 10.0  # see onnx_rewrites.scale_outlier_readers; a Gaussian tensor of 3 M values reads ~5
CALIBRATION_CLICKS = 3  # clicks per calibration image for the decoder
FIRST_EVAL_SEED = 1000  # evaluation images never share a seed with the calibration ones


# -- calibration inputs -----------------------------------------------------------------------------------------


def calibration_images(folder: Path | None, count: int, first_seed: int = 0) -> list[np.ndarray]:
    """Model inputs (1x3x1024x1024 in [0, 1]) from a folder of images, or photo-like synthetic ones."""
    from segnext_backend.geometry import to_model_input
    from tools.scenes import natural_image

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


def _save(model, target: Path) -> None:
    import onnx

    with written_atomically(target) as tmp:
        onnx.save_model(model, str(tmp))


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
            # The element count at run time: shape inference leaves the sizes behind dynamic Reshapes unknown.
            model.graph.node.append(helper.make_node("Size", [name], [f"{name}/calibration_Size"]))
            outputs.append(f"{name}/calibration_Size")
        del model.graph.output[:]
        model.graph.output.extend(
            helper.make_tensor_value_info(o, onnx.TensorProto.INT64 if o.endswith("_Size") else onnx.TensorProto.FLOAT, [])
            for o in outputs
        )
        serialized = model.SerializeToString()
        session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
        del serialized
        del model.graph.node[node_count:]
        del model.graph.output[:]
        model.graph.output.extend(original_outputs)
        for feed in feeds:
            values = session.run(outputs, feed)
            for name, low, high, sum_square, size in zip(chunk, values[0::4], values[1::4], values[2::4], values[3::4]):
                seen = ranges.setdefault(name, [float(low), float(high)])
                seen[0], seen[1] = min(seen[0], float(low)), max(seen[1], float(high))
                if size and sum_square > 0:
                    rms = float(np.sqrt(float(sum_square) / int(size)))
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
    ViT's known massive activations) dwarf the rest, and its GroupNorms keep them that far above the rest
    down to the head. `--float32-outliers` keeps such nodes float32 (those scale_outlier_readers did not
    make safe).
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

    First: the Convs that read an input with no MatMul or Conv on the way (the embeddings), and the
    rearranging ops (Concat, Resize, ...) on that way. The decoder's prompt embedding mixes channels of very
    different scales (the previous mask's probability beside the click disks), which one int8 scale per
    output channel cannot hold; the encoder's reads raw pixels; the clicks' coordinates would lose 4 pixels
    to a uint8 step. Last: the Conv whose output reaches a graph output with no MatMul or Conv on the way,
    and the ops after it (the decoder's final 1x1 conv writes the logits, whose sign is the mask, and the
    Resize to 1024x1024 carries them). Together ~2 % of the work.
    """
    import onnx

    constants = {init.name for init in model.graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(model).graph
    not_float = {  # shape arithmetic (int64): the quantiser leaves it alone anyway
        info.name for info in list(inferred.value_info) + list(inferred.input)
        if info.type.tensor_type.elem_type not in (0, onnx.TensorProto.FLOAT)
    }
    raw = {i.name for i in model.graph.input}  # tensors computed from the inputs by no MatMul or Conv
    found = []
    for node in model.graph.node:  # graph order is topological
        data = [name for name in node.input if name and name not in constants]
        if node.op_type == "Conv" and node.input[0] in raw:
            found.append(node.name)
        elif node.op_type in REARRANGING_OP_TYPES and any(name in raw for name in data):
            found.append(node.name)
            if all(name in raw for name in data):
                raw.update(node.output)
        elif node.op_type not in WEIGHTED_OP_TYPES and all(name in raw for name in data):
            raw.update(node.output)
    final = {o.name for o in model.graph.output}  # tensors that reach an output through no MatMul or Conv
    for node in reversed(model.graph.node):
        if any(name in final for name in node.output):
            if node.op_type == "Conv":
                found.append(node.name)
            elif node.op_type not in WEIGHTED_OP_TYPES:
                if node.op_type in REARRANGING_OP_TYPES:
                    found.append(node.name)
                final.update(name for name in node.input if name not in constants)
    by_name = {node.name: node for node in model.graph.node}
    return list(dict.fromkeys(name for name in found if name and not set(by_name[name].output) & not_float))


def _probe_feed(model) -> dict:
    """Zeros of each graph input's shape (a dimension left open: 1), to learn the shapes inside a graph."""
    import onnx

    feed = {}
    for graph_input in model.graph.input:
        tensor_type = graph_input.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor_type.shape.dim]
        feed[graph_input.name] = np.zeros(dims, onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    return feed


def target_cpu_class(target_cpu: str = "auto") -> str:
    """The CPU class (segnext_backend.cpu.CPU_CLASSES) a variant is made for: `auto` is this CPU's, and a CPU
    whose class is unknown (no /proc/cpuinfo) is taken as the class without VNNI, which is right everywhere."""
    from segnext_backend.cpu import CPU_CLASSES, cpu_class, cpu_flags

    if target_cpu == "auto":
        return cpu_class(cpu_flags()) or "avx2"
    if target_cpu not in CPU_CLASSES:
        raise ValueError(f"unknown --target-cpu {target_cpu!r}; choose auto or one of {', '.join(CPU_CLASSES)}")
    return target_cpu


def describe_this_cpu() -> str:
    """This CPU's class and what it means for int8, in words (the tool prints it before building and comparing)."""
    from segnext_backend.cpu import cpu_class, cpu_flags, has_vnni

    flags = cpu_flags()
    vnni = "VNNI: 8-bit int8 weights are exact" if has_vnni(flags) else "no VNNI: 8-bit int8 weights saturate"
    return f"{cpu_class(flags) or 'unknown class'} ({vnni})"


def recipe_for_cpu(target_class: str) -> tuple[str, str]:
    """The recipe `auto` means for a CPU class, and why, in words (the tool logs it)."""
    from segnext_backend.cpu import int8_saturates

    if int8_saturates(target_class):
        return "int8-decoder", (
            f"{target_class} CPUs have no VNNI, so their int8 weights get 7 bits, which cost agreement: int8 in the "
            "decoder only, its head and outlier readers float32, keeps the masks closest to float32's"
        )
    return "int8+fused-attention", f"{target_class} CPUs add int8 products exactly (VNNI): the fastest int8 recipe"


def resolve_recipe(recipe: str, target_cpu: str = "auto") -> tuple[str, str | None]:
    """(the recipe to build, why it was chosen or None): `auto` becomes the recipe for the target CPU's class."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if recipe != "auto":
        return recipe, None
    return recipe_for_cpu(target_cpu_class(target_cpu))


def head_nodes(model) -> list[str]:
    """Names of the decoder head's quantisable nodes: the convolutions between the neck and the logits (and the
    rearranging ops among them), named /head/... in a SegNext export."""
    found = [node.name for node in model.graph.node if node.name.startswith("/head/") and node.op_type in STATIC_OP_TYPES]
    if not found:
        raise ValueError("the decoder has no /head/ nodes: not a SegNext decoder export (tools.convert_checkpoint)")
    return found


def int8_weights(target_cpu: str) -> dict:
    """quantize_static's arguments for the weights on a CPU class: 8 bits where the CPU adds uint8 x int8
    products in 32 bits (VNNI), 7 bits (`reduce_range`) where it adds pairs of them in 16 bits and would
    saturate (segnext_backend/cpu.py); uint8 activations x int8 weights either way, the combination ONNX
    Runtime's x86 kernels run fastest."""
    from onnxruntime.quantization import QuantType

    from segnext_backend.cpu import int8_saturates

    return {
        "activation_type": QuantType.QUInt8, "weight_type": QuantType.QInt8, "reduce_range": int8_saturates(target_cpu)
    }


def _quantize_static(
    model, target: Path, feeds: list[dict], scratch: Path, float32_outliers: bool, threads: int = 0, log=print,
    target_cpu: str = "auto", float32_head: bool = False, recipe: str = "int8+fused-attention",
) -> None:
    """Calibrate, make the outlier readers safe, and write the QDQ int8 model of `model` (loaded, float32) for
    a CPU of class `target_cpu` (`auto`: this one); `float32_head` keeps the decoder's head float32."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    from segnext_backend.cpu import INT8_METADATA_KEY

    prepared = scratch / f"{target.stem}.onnx"
    _save(model, prepared)
    ranges, peak_to_rms = calibrate_ranges(prepared, feeds, threads=threads)
    edges = edge_nodes(model)  # before the scaling adds paths from one node's output to another's input
    spiky = {name for name, ratio in peak_to_rms.items() if ratio > SCALE_PEAK_TO_RMS}
    scaled = scale_outlier_readers(model, spiky, _probe_feed(model), skip=set(edges))
    # After the scaling, which reads a ConvTranspose as such; ONNX Runtime has no int8 ConvTranspose.
    patchified = patchify_conv_transposes(model)
    if scaled or patchified:
        _save(model, prepared)
        ranges, peak_to_rms = calibrate_ranges(prepared, feeds, threads=threads)
    kept_float = edges + (outlier_readers(model, peak_to_rms) if float32_outliers else [])
    kept_float += head_nodes(model) if float32_head else []
    kept_float = list(dict.fromkeys(kept_float))
    highest = sorted(peak_to_rms.items(), key=lambda kv: -kv[1])[:4]
    log(
        f"{target.stem}: {len(scaled)} nodes read per-pixel scaled inputs; "
        f"kept float32: {', '.join(kept_float) or 'nothing'}; "
        "highest peak/RMS: " + ", ".join(f"{name} {ratio:.0f}" for name, ratio in highest)
    )
    ranges_path = scratch / f"{target.stem}.ranges.json"
    save_tensors_data(ranges, ranges_path)
    target_class = target_cpu_class(target_cpu)
    weights = int8_weights(target_class)
    log(
        f"{target.stem}: int8 for {target_class} CPUs: "
        + ("7-bit weights, so that the 16-bit pair sums of CPUs without VNNI never saturate"
           if weights["reduce_range"] else "8-bit weights (exact only where the CPU has VNNI)")
    )
    with written_atomically(target) as tmp:
        quantize_static(
            str(prepared),
            str(tmp),
            None,  # the ranges come from the file calibrate_ranges wrote
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=STATIC_OP_TYPES,
            per_channel=True,
            nodes_to_exclude=kept_float,
            calibration_cache_path=ranges_path,
            **weights,
        )
        quantized = onnx.load(str(tmp))
        made_for = {"target_cpu": target_class, "weight_bits": 7 if weights["reduce_range"] else 8, "recipe": recipe}
        props = {prop.key: prop.value for prop in quantized.metadata_props}  # the source's, kept
        onnx.helper.set_model_props(quantized, {**props, INT8_METADATA_KEY: json.dumps(made_for)})
        onnx.save_model(quantized, str(tmp))


def _quantize_dynamic(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with written_atomically(target) as tmp:
        quantize_dynamic(str(source), str(tmp), op_types_to_quantize=DYNAMIC_OP_TYPES, weight_type=QuantType.QInt8)


def build_variant(
    model_dir: Path,
    out_dir: Path,
    recipe: str = DEFAULT_RECIPE,
    images_dir: Path | None = None,
    calibration_count: int = 2,
    threads: int = 0,
    float32_outliers: bool = False,
    log=print,
    target_cpu: str = "auto",
) -> tuple[Path, Path]:
    """Write OUT_DIR/encoder.onnx and OUT_DIR/decoder.onnx made from MODEL_DIR's float32 pair by `recipe`; the
    int8 recipes for CPUs of class `target_cpu` (`auto`: this one), and `auto` the recipe for that class."""
    import onnx

    recipe, why = resolve_recipe(recipe, target_cpu)
    if why:
        log(f"recipe {recipe}: {why}")
    if out_dir.resolve() == model_dir.resolve():
        raise ValueError("--out must be another folder than MODEL_DIR: the float32 pair is the calibration source")
    if float32_outliers and recipe not in STATIC_RECIPES:
        raise ValueError(f"--float32-outliers applies to the static int8 recipes ({', '.join(STATIC_RECIPES)})")
    # int8-decoder: the encoder gets the exact rewrites, the decoder int8 with its outlier readers and head float32.
    static_roles = {"encoder", "decoder"} if recipe in ("int8+fused-attention", "int8") else set()
    if recipe == "int8-decoder":
        static_roles, float32_outliers = {"decoder"}, True
    fuse = recipe in ("int8+fused-attention", "int8-decoder", "fused-attention", "exact")
    # Distributed, the head's fusion conv is cheaper in float32 but its int8 parts would add in uint8.
    distribute = recipe == "exact" or float32_outliers
    out_dir.mkdir(parents=True, exist_ok=True)
    feeds = {}
    if static_roles:
        started = time.perf_counter()
        images = calibration_images(images_dir, calibration_count)
        feeds["encoder"], feeds["decoder"] = calibration_feeds(model_dir, images, threads)
        log(f"calibration inputs: {len(feeds['encoder'])} images, {len(feeds['decoder'])} clicks "
            f"({time.perf_counter() - started:.0f} s)")
    with tempfile.TemporaryDirectory(prefix="segnext-quantize-", dir=out_dir) as scratch:
        for role in ROLES:
            started = time.perf_counter()
            source, target = model_dir / f"{role}.onnx", out_dir / f"{role}.onnx"
            if recipe == "int8-dynamic":
                _quantize_dynamic(source, target)
            else:
                model = onnx.load(str(source))
                static = role in static_roles
                if fuse:
                    log(f"{role}: {fuse_attention(model)} attentions fused")
                if static or distribute:
                    fold_identity_initializers(model)  # the rewrites need the biases as initializers
                if distribute:
                    distributed = distribute_concat_convs(model, _probe_feed(model))
                    log(f"{role}: {distributed} convolutions over a concatenation distributed")
                if static:
                    _quantize_static(
                        model, target, feeds[role], Path(scratch), float32_outliers, threads, log, target_cpu,
                        float32_head=recipe == "int8-decoder", recipe=recipe,
                    )
                else:
                    _save(model, target)
                del model
            log(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - started:.0f} s)")
    return out_dir / "encoder.onnx", out_dir / "decoder.onnx"


# -- measuring --------------------------------------------------------------------------------------------------


def _engine(model_dir: Path, threads: int, device: str | None = None):
    """The pair as the backend would serve it: its settings (DEVICE, OPENVINO_PRECISION, ORT_ENCODER_MEMORY_ARENA,
    ...) apply; `device` overrides DEVICE."""
    from segnext_backend.device import choose_execution_providers
    from segnext_backend.engine import SegNextEngine
    from segnext_backend.settings import Settings

    settings = Settings.from_env()
    return SegNextEngine(
        model_dir / "encoder.onnx",
        model_dir / "decoder.onnx",
        intra_op_threads=threads,
        providers=choose_execution_providers(
            device or settings.device, openvino_precision=settings.openvino_precision, threads=threads
        ),
        encoder_memory_arena=settings.encoder_memory_arena,
        decoder_memory_arena=settings.decoder_memory_arena,
    )


def compare(
    model_dir: Path, variant_dir: Path, images: int = 3, clicks: int = 5, threads: int = 0, device: str | None = None
) -> dict:
    """Time both pairs alternately and compare the variant's masks per click with float32's: MODEL_DIR's pair
    on ONNX Runtime's CPU provider, the variant on `device` (default: the DEVICE setting)."""
    from segnext_backend.geometry import ModelFrame
    from segnext_backend.masks import logits_to_mask, sigmoid
    from tools.scenes import iou

    engines = {
        "float32": _engine(model_dir, threads, "cpu"),
        "variant": _engine(variant_dir, threads, device),
    }
    frame = ModelFrame(1024, 1024)
    times = {name: {"encoder": [], "decoder": []} for name in engines}
    ious, first_ious, fractions = [], [], []
    inputs = calibration_images(None, images, first_seed=FIRST_EVAL_SEED)
    for engine in engines.values():  # a session's first run pays one-off costs: not timed
        points, labels = click_session(FIRST_EVAL_SEED - 1, 1)
        engine.decode(engine.encode(inputs[0]), points, labels, np.zeros((1024, 1024), np.float32))
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
    result["variant_int8"] = engines["variant"].files["decoder"].int8
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
    int8 = result.get("variant_int8")
    if int8:
        print(
            f"the variant's int8 was made for {int8['made_for']} CPUs; on this one ({int8['this_cpu']}): {int8['why']}"
        )


def peak_memory(model_dir: Path, clicks: int = 3, threads: int = 0) -> float:
    """Peak RSS (MB) of this process after loading the pair, encoding one image and decoding `clicks` clicks."""
    from segnext_backend.masks import sigmoid

    engine = _engine(model_dir, threads)
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
    parser.add_argument("--recipe", choices=RECIPES, default=DEFAULT_RECIPE,
                        help="auto (default): int8+fused-attention for a CPU with VNNI, int8-decoder without")
    parser.add_argument("--calibration-images", type=Path, help="folder of representative images (default: synthetic)")
    parser.add_argument("--calibration-count", type=int, default=2, help="images to calibrate on (3 clicks each)")
    parser.add_argument("--compare", action="store_true", help="then time float32 vs the variant and compare masks")
    parser.add_argument("--skip-build", action="store_true", help="with --compare: OUT_DIR already holds the variant")
    parser.add_argument("--images", type=int, default=3, help="--compare: evaluation images")
    parser.add_argument("--clicks", type=int, default=5, help="--compare: clicks per image")
    parser.add_argument("--peak-memory", action="store_true", help="print the peak RSS of serving MODEL_DIR's pair")
    parser.add_argument("--float32-outliers", action="store_true",
                        help="keep float32 the int8 candidates that read a tensor whose peak is over 40x its RMS: "
                        "masks closer to float32, slower (docs/performance.md)")
    parser.add_argument("--device", choices=("cpu", "openvino"),
                        help="--compare: where the variant runs (default: the DEVICE setting); with no --out, the "
                        "variant is MODEL_DIR's own pair there: `--compare --device openvino` measures OpenVINO's bf16")
    parser.add_argument("--target-cpu", choices=("auto",) + CPU_CLASSES, default="auto",
                        help="the static int8 recipes: the class of the CPU that will serve the variant (default: "
                        "this one's). avx2 and avx512 (no VNNI) get 7-bit weights, which never saturate; "
                        "avx512-vnni and avx512-bf16 8-bit ones, exact only with VNNI; the `auto` recipe follows it")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    for role in ROLES:
        if not (args.model_dir / f"{role}.onnx").is_file():
            parser.error(f"{args.model_dir} has no {role}.onnx")
    if args.peak_memory:
        print(f"peak RSS serving {args.model_dir}: {peak_memory(args.model_dir, threads=args.threads):,.0f} MB")
        return 0
    if args.out is None and args.compare and args.device:
        args.out, args.skip_build = args.model_dir, True  # the same files, on another device
    if args.out is None:
        parser.error("--out OUT_DIR is required")
    if not args.skip_build:
        print(f"this CPU: {describe_this_cpu()}")
        recipe, why = resolve_recipe(args.recipe, args.target_cpu)
        if why:
            print(f"recipe {recipe}: {why}")
        build_variant(
            args.model_dir, args.out, recipe, args.calibration_images, args.calibration_count, args.threads,
            args.float32_outliers, target_cpu=args.target_cpu,
        )
        int8_encoder = recipe in ("int8+fused-attention", "int8", "int8-dynamic")
        arena = " ORT_ENCODER_MEMORY_ARENA=true" if int8_encoder else ""
        print(f"serve it with MODEL_DIR={args.out}{arena} (README, \"Faster clicks on CPU\")")
    if args.compare:
        print(f"comparing on this CPU: {describe_this_cpu()}")
        print_comparison(compare(args.model_dir, args.out, args.images, args.clicks, args.threads, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
