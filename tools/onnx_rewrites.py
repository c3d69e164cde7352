"""Exact rewrites of ONNX graphs that make ONNX Runtime's CPU kernels faster or int8 quantisation closer.

Each function changes a loaded `onnx.ModelProto` in place and returns what it changed; none changes what the
graph computes beyond float rounding, except where a docstring says so. `tools/quantize.py` chains them into
recipes.
"""

from __future__ import annotations

import numpy as np

MSFT_DOMAIN = "com.microsoft"

# -- helpers ----------------------------------------------------------------------------------------------------


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


def tensor_shapes(model, names, feed: dict) -> dict[str, tuple[int, ...]]:
    """The shapes `names` take when `model` runs on `feed`: shape inference leaves those behind a Reshape whose
    shape is computed at run time (SegNext's GroupNorms) unknown."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return {name: tuple(value.shape) for name, value in zip(names, session.run(None, feed))}


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _drop_unused(graph) -> None:
    """Remove the nodes and initializers that nothing reads any more (a rewrite's leftovers)."""
    nodes = list(graph.node)
    while True:
        used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


# -- attention fusion -------------------------------------------------------------------------------------------


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
    _drop_unused(graph)  # the scale constants went with their Mul
    if not any(opset.domain == MSFT_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MSFT_DOMAIN, 1))
    return fused


# -- int8 preparation -------------------------------------------------------------------------------------------


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
        new_nodes.append(
            helper.make_node(
                "DepthToSpace", [f"{tag}/as_conv"], [node.output[0]], name=f"{tag}/depth_to_space", blocksize=block, mode="CRD"
            )
        )
        rewritten += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused(graph)  # the transposed weights
    return rewritten


def _one_pixel_per_output_block(node, weight) -> bool:
    """A Conv or ConvTranspose whose kernel equals its stride, ungrouped and unpadded: each output block reads
    exactly one input block (a 1x1 Conv: one pixel)."""
    attrs = _attributes(node)
    kernel = list(weight.dims[2:])
    return (
        len(kernel) == 2
        and kernel[0] == kernel[1]
        and list(attrs.get("strides", [1, 1])) == kernel
        and attrs.get("group", 1) == 1
        and not any(attrs.get("pads", [0]))
        and not any(attrs.get("output_padding", [0]))
        and all(d == 1 for d in attrs.get("dilations", [1, 1]))
        and "output_shape" not in attrs
        and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
    )


def scale_outlier_readers(
    model, tensors: set[str], feed: dict, max_pixels: int = 64 * 64, skip: set[str] = frozenset()
) -> list[str]:
    """Let each Conv / ConvTranspose that reads one of `tensors` see every pixel scaled to a peak of 1.

    A transformer's residual stream carries a few tokens far above the rest (a click's, a ViT's "massive
    activations"); one uint8 scale per tensor then leaves the other tokens a few of its 256 steps. For an op
    whose output block depends on one input pixel (a 1x1 Conv, a kxk stride-k Conv or ConvTranspose),
    `op(x) = op(x / s) * s + bias` when `s` is constant over what each output block reads: here `s` is each
    pixel's largest |value| over the channels (for a stride-k Conv, the largest of its k x k block), computed
    per run. The int8 op then reads `x / s`, in [-1, 1] for every token: one scale per pixel, as per-token
    activation quantisation has, built from ops ONNX Runtime already has. Exact in float32. Only tensors of
    at most `max_pixels` pixels (SegNext: the 64x64 token grid and coarser) are scaled: on larger ones the
    extra passes cost more than int8 saves. Nodes named in `skip` (those staying float32) are left alone.
    Returns the names of the nodes rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = [
        node
        for node in graph.node
        if node.op_type in ("Conv", "ConvTranspose")
        and node.name not in skip
        and node.input[0] in tensors
        and node.input[1] in initializers
        and _one_pixel_per_output_block(node, initializers[node.input[1]])
    ]
    if not readers:
        return []
    shapes = tensor_shapes(model, sorted({node.input[0] for node in readers}), feed)
    readers = [
        node for node in readers if len(shapes[node.input[0]]) == 4 and np.prod(shapes[node.input[0]][2:]) <= max_pixels
    ]
    rewritten = {id(node) for node in readers}
    scaled: dict[tuple[str, str, int], tuple[str, str]] = {}  # (tensor, op, k) -> (input to read, scale to multiply by)
    new_nodes = []

    def constant(name: str, value) -> str:
        if name not in initializers:
            initializers[name] = numpy_helper.from_array(np.asarray(value), name)
            graph.initializer.append(initializers[name])
        return name

    for node in graph.node:
        if id(node) not in rewritten:
            new_nodes.append(node)
            continue
        tensor, k = node.input[0], initializers[node.input[1]].dims[2]
        peak = f"{tensor}/pixel_peak"
        if (tensor, "", 1) not in scaled:
            # The floor keeps an all-zero pixel at 0 / tiny = 0 instead of 0 / 0.
            new_nodes += [
                helper.make_node("Abs", [tensor], [f"{tensor}/abs"]),
                helper.make_node("ReduceMax", [f"{tensor}/abs"], [f"{peak}_raw"], axes=[1], keepdims=1),
                helper.make_node("Max", [f"{peak}_raw", constant("pixel_peak_floor", np.float32(1e-30))], [peak]),
                helper.make_node("Div", [tensor, peak], [f"{tensor}/per_pixel"]),
            ]
            scaled[(tensor, "", 1)] = (f"{tensor}/per_pixel", peak)
        key = (tensor, node.op_type if k > 1 else "", k)
        if key not in scaled:
            upsample = constant(f"pixel_peak_upsample_{k}", np.array([1, 1, k, k], np.float32))
            if node.op_type == "Conv":  # one scale per k x k block, the block's peak
                block = f"{peak}_block{k}"
                new_nodes += [
                    helper.make_node("MaxPool", [peak], [block], kernel_shape=[k, k], strides=[k, k]),
                    helper.make_node("Resize", [block, "", upsample], [f"{block}_per_pixel"], mode="nearest"),
                    helper.make_node("Div", [tensor, f"{block}_per_pixel"], [f"{tensor}/per_block{k}"]),
                ]
                scaled[key] = (f"{tensor}/per_block{k}", block)
            else:  # a transposed conv writes a k x k block from each pixel: the pixel's scale, upsampled
                new_nodes.append(helper.make_node("Resize", [peak, "", upsample], [f"{peak}_up{k}"], mode="nearest"))
                scaled[key] = (f"{tensor}/per_pixel", f"{peak}_up{k}")
        reads, scale = scaled[key]
        tag = node.name or node.output[0]
        new_nodes.append(
            helper.make_node(node.op_type, [reads, node.input[1]], [f"{tag}/scaled"], name=node.name, **_attributes(node))
        )
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        unscaled = f"{tag}/unscaled" if bias else node.output[0]
        new_nodes.append(helper.make_node("Mul", [f"{tag}/scaled", scale], [unscaled]))
        if bias:
            per_channel = numpy_helper.to_array(initializers[bias]).reshape(1, -1, 1, 1)
            new_nodes.append(helper.make_node("Add", [unscaled, constant(f"{tag}/bias", per_channel)], [node.output[0]]))
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused(graph)
    return [node.name for node in readers]


def distribute_concat_convs(model, feed: dict) -> int:
    """Rewrite `Conv1x1(Concat([a, Resize(b), ...]))` as `Conv1x1_a(a) + Resize(Conv1x1_b(b)) + ...`.

    A 1x1 convolution over a channel concatenation is the sum of 1x1 convolutions over its parts, each with
    its slice of the weights; and a linear or nearest Resize, the same weights for every channel, commutes
    with a 1x1 convolution. SegNext's head upsamples three of its four levels to 256x256 and concatenates
    them into 1024 channels before its fusion conv: rewritten, the 268 MB concatenation is never written and
    three quarters of the fusion conv run at 128x128, 64x64 and 32x32. Exact up to float rounding (the bias is
    added once). `feed` gives the parts' channel counts, which shape inference does not know. Returns the
    number of convolutions distributed.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def sole_reader(name: str) -> bool:
        return len(readers.get(name, [])) == 1 and name not in graph_outputs

    candidates = []
    for conv in graph.node:
        concat = producer.get(conv.input[0]) if conv.op_type == "Conv" else None
        weight = initializers.get(conv.input[1]) if concat is not None else None
        if (
            weight is not None
            and list(weight.dims[2:]) == [1, 1]
            and _one_pixel_per_output_block(conv, weight)
            and concat.op_type == "Concat"
            and _attributes(concat).get("axis") in (1, -3)
            and sole_reader(conv.input[0])
        ):
            candidates.append((conv, concat))
    if not candidates:
        return 0
    shapes = tensor_shapes(model, sorted({name for _, concat in candidates for name in concat.input}), feed)
    replacement, removed = {}, set()
    for conv, concat in candidates:
        widths = [shapes[name][1] if len(shapes[name]) == 4 else None for name in concat.input]
        weight = numpy_helper.to_array(initializers[conv.input[1]])
        if None in widths or sum(widths) != weight.shape[1]:
            continue
        tag = conv.name or conv.output[0]
        nodes, parts, offset = [], [], 0
        for index, (name, width) in enumerate(zip(concat.input, widths)):
            part_weight = numpy_helper.from_array(
                np.ascontiguousarray(weight[:, offset : offset + width]), f"{tag}/part{index}_weight"
            )
            graph.initializer.append(part_weight)
            offset += width
            resize = producer.get(name)
            moves = (
                resize is not None
                and resize.op_type == "Resize"
                and sole_reader(name)
                and _attributes(resize).get("mode", b"nearest") in (b"linear", b"nearest", "linear", "nearest")
            )
            part = f"{tag}/part{index}"
            nodes.append(helper.make_node("Conv", [resize.input[0] if moves else name, part_weight.name], [part], name=part))
            if moves:
                resize_inputs = list(resize.input) + [""] * (4 - len(resize.input))
                if resize_inputs[3]:  # sizes: the new channel count, the old height and width
                    sizes = f"{part}/sizes"
                    for constant, value in (("concat_conv_two", [2]), ("concat_conv_four", [4])):
                        if constant not in initializers:
                            initializers[constant] = numpy_helper.from_array(np.array(value, np.int64), constant)
                            graph.initializer.append(initializers[constant])
                    nodes += [
                        helper.make_node("Shape", [part], [f"{sizes}_nc"], end=2),
                        helper.make_node("Slice", [resize_inputs[3], "concat_conv_two", "concat_conv_four"], [f"{sizes}_hw"]),
                        helper.make_node("Concat", [f"{sizes}_nc", f"{sizes}_hw"], [sizes], axis=0),
                    ]
                    resize_inputs[3] = sizes
                nodes.append(
                    helper.make_node(
                        "Resize", [part] + resize_inputs[1:], [f"{part}/resized"], name=f"{part}/resize", **_attributes(resize)
                    )
                )
                part = f"{part}/resized"
                removed.add(id(resize))
            parts.append(part)
        total = parts[0]
        for index, part in enumerate(parts[1:], 1):
            nodes.append(helper.make_node("Add", [total, part], [f"{tag}/sum{index}"], name=f"{tag}/sum{index}"))
            total = f"{tag}/sum{index}"
        if len(conv.input) > 2 and conv.input[2]:
            bias = numpy_helper.to_array(initializers[conv.input[2]]).reshape(1, -1, 1, 1)
            graph.initializer.append(numpy_helper.from_array(bias, f"{tag}/bias"))
            nodes.append(helper.make_node("Add", [total, f"{tag}/bias"], [conv.output[0]], name=f"{tag}/bias_add"))
        else:
            nodes.append(helper.make_node("Identity", [total], [conv.output[0]]))
        replacement[id(conv)] = nodes
        removed.add(id(concat))
    new_nodes = []
    for node in graph.node:
        if id(node) in replacement:
            new_nodes += replacement[id(node)]
        elif id(node) not in removed:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused(graph)
    return len(replacement)
