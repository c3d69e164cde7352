"""Random-weight SegNext benchmark models: architecture size, ONNX interface and ONNX-vs-PyTorch numerics.

Needs torch (requirements-torch.txt, the CPU build, installed by scripts/test.sh); without it this module is skipped.
"""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
np = pytest.importorskip("numpy")

# `tools` is a plain directory at the repository root; make it importable however pytest is started.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.build_benchmark_models import example_inputs  # noqa: E402
from tools.segnext_arch import (  # noqa: E402
    EXPECTED_PARAMS_M,
    SegNextConfig,
    SegNextDecoder,
    SegNextEncoder,
    SegNextModel,
    rasterise_clicks,
)


def test_full_size_param_counts_match_segnext_md():
    # seed=None skips the random init: counting 114 M parameters then takes well under a second.
    counts = SegNextModel(SegNextConfig(), seed=None).param_counts()
    assert counts.keys() == EXPECTED_PARAMS_M.keys()
    for part, n in counts.items():
        assert n / 1e6 == pytest.approx(EXPECTED_PARAMS_M[part], rel=0.01), part


def test_full_size_state_dict_layout():
    sd = SegNextModel(SegNextConfig(), seed=None).state_dict()
    assert sd["backbone.pos_embed"].shape == (1, 4097, 768)
    assert sd["backbone.patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert sd["visual_prompts_encoder.proj.weight"].shape == (768, 3, 16, 16)
    assert sd["backbone.blocks.11.mlp.fc1.weight"].shape == (3072, 768)
    assert "backbone.fc_norm.weight" in sd
    assert sd["fusion_blocks.1.attn.qkv.bias"].shape == (2304,)
    neck_idx = {
        name: sorted({int(k.split(".")[2]) for k in sd if k.startswith(f"neck.{name}.")})
        for name in ("down_4", "down_8", "down_16", "down_32")
    }
    assert neck_idx == {
        "down_4": [0, 1, 3, 4, 5, 6],
        "down_8": [0, 1, 2, 3],
        "down_16": [0, 1],
        "down_32": [0, 1, 2, 3],
    }
    assert sd["head.convs.3.conv.weight"].shape == (256, 1024, 1, 1)
    assert sd["head.fusion_conv.conv.weight"].shape == (256, 1024, 1, 1)
    assert sd["head.seg_conv.weight"].shape == (1, 256, 1, 1)


def test_rasterise_clicks_disks():
    coords = torch.tensor([[[10.0, 20.0], [100.0, 50.0], [500.0, 500.0]]])
    labels = torch.tensor([[1.0, 0.0, -1.0]])  # the third click is padding
    disks = rasterise_clicks(coords, labels, size=1024, radius=5.0)
    assert disks.shape == (1, 2, 1024, 1024)
    pos, neg = disks[0, 0], disks[0, 1]
    assert pos[20, 10] == 1 and pos[20, 15] == 1 and pos[20, 16] == 0  # closed disk of radius 5 around (x, y)
    assert neg[50, 100] == 1 and neg[53, 104] == 1 and neg[54, 104] == 0
    assert pos.sum() == neg.sum() == 81  # lattice points with x^2 + y^2 <= 25
    assert disks[0, :, 500, 500].sum() == 0  # padding is ignored


def _session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _io(path):
    graph = onnx.load(str(path)).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in list(graph.input) + list(graph.output)}


def test_onnx_interface(shallow_segnext):
    _, enc_path, dec_path = shallow_segnext
    f32 = onnx.TensorProto.FLOAT
    assert _io(enc_path) == {"image": (f32, [1, 3, 1024, 1024]), "image_feats": (f32, [1, 768, 64, 64])}
    assert _io(dec_path) == {
        "image_feats": (f32, [1, 768, 64, 64]),
        "point_coords": (f32, [1, "num_points", 2]),
        "point_labels": (f32, [1, "num_points"]),
        "prev_mask": (f32, [1, 1, 1024, 1024]),
        "mask": (f32, [1, 1, 1024, 1024]),
    }
    for path in (enc_path, dec_path):
        model = onnx.load(str(path))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
        # Weights live inside the file: no external-data initialisers.
        assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
        # Input/output order matters to callers that feed by position.
        assert [i.name for i in model.graph.input] == (
            ["image"] if path == enc_path else ["image_feats", "point_coords", "point_labels", "prev_mask"]
        )


def test_encoder_matches_pytorch(shallow_segnext):
    model, enc_path, _ = shallow_segnext
    image, _ = example_inputs(model.cfg, seed=1)
    with torch.no_grad():
        ref = SegNextEncoder(model)(image).numpy()
    out = _session(enc_path).run(["image_feats"], {"image": image.numpy()})[0]
    assert out.shape == (1, 768, 64, 64)
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("num_points", [1, 3])
def test_decoder_matches_pytorch_dynamic_clicks(shallow_segnext, num_points):
    model, _, dec_path = shallow_segnext
    _, (feats, coords, labels, prev) = example_inputs(model.cfg, num_points=num_points, seed=2)
    with torch.no_grad():
        ref = SegNextDecoder(model)(feats, coords, labels, prev).numpy()
    feeds = {
        "image_feats": feats.numpy(),
        "point_coords": coords.numpy(),
        "point_labels": labels.numpy(),
        "prev_mask": prev.numpy(),
    }
    out = _session(dec_path).run(["mask"], feeds)[0]
    assert out.shape == (1, 1, 1024, 1024)
    assert np.isfinite(out).all()
    # Random weights still give O(1) logits that vary over the image, so the comparison means something.
    assert 0.1 < np.abs(ref).max() < 100 and ref.std() > 1e-3
    assert np.abs(out - ref).max() < 1e-3
