"""tools/convert_checkpoint.py: a SegNext checkpoint in upstream's format -> the ONNX pair the backend serves;
other files refused with a message saying why, and no code from a checkpoint ever run."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import ROOT, click_on, encode_png, make_scene, predict_body

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from segnext_backend.model_files import file_sha256  # noqa: E402
from tools.build_benchmark_models import example_inputs  # noqa: E402
from tools.convert_checkpoint import CheckpointError, build_model, load_checkpoint  # noqa: E402
from tools.segnext_arch import SegNextConfig, SegNextDecoder, SegNextModel  # noqa: E402


def upstream_config(cfg: SegNextConfig) -> dict:
    """The `config` upstream's training code saves beside the weights (its `serialize` decorator's layout)."""

    def entry(value):
        return {"type": "builtin", "value": value, "specified": True}

    backbone = dict(
        img_size=(1024, 1024), patch_size=(16, 16), in_chans=3, embed_dim=cfg.embed_dim, depth=cfg.encoder_depth,
        global_atten_freq=cfg.global_block_indices[0] + 1, num_heads=cfg.num_heads, mlp_ratio=4, qkv_bias=True,
    )
    fusion = dict(type="self_attention", depth=cfg.num_fusion_blocks, params=dict(dim=cfg.embed_dim, num_heads=cfg.num_heads, mlp_ratio=4, qkv_bias=True))
    return {
        "class": "isegm.model.is_plainvit_model.PlainVitModel",
        "params": {
            "backbone_params": entry(backbone),
            "neck_params": entry(dict(in_dim=cfg.embed_dim, out_dims=list(cfg.neck_out_dims))),
            "head_params": entry(dict(in_channels=list(cfg.neck_out_dims), in_select_index=[0, 1, 2, 3], dropout_ratio=0.1, num_classes=1, out_channels=256)),
            "fusion_params": entry(fusion),
            "norm_radius": entry(5),
            "use_disks": entry(True),
            "cpu_dist_maps": {"type": "builtin", "value": False, "specified": False},
            "norm_mean_std": {"type": "builtin", "value": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "specified": False},
        },
    }


def shapes_only(cfg: SegNextConfig) -> dict:
    """A state dict with `cfg`'s keys and shapes whose tensors cost nothing (one value each, broadcast)."""
    with torch.device("meta"):
        shapes = {key: tensor.shape for key, tensor in SegNextModel(cfg, seed=None).state_dict().items()}
    return {key: torch.zeros(1).expand(shape) for key, shape in shapes.items()}


@pytest.fixture(scope="module")
def shallow_checkpoint(tmp_path_factory):
    """A random shallow SegNext saved as upstream saves a checkpoint, and the model it came from."""
    cfg = SegNextConfig.shallow()
    model = SegNextModel(cfg, seed=7)
    path = tmp_path_factory.mktemp("checkpoint") / "segnext_shallow_epoch_0.pth"
    torch.save({"state_dict": model.state_dict(), "config": upstream_config(cfg)}, path)
    return path, model


def run_converter(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.convert_checkpoint", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def test_a_checkpoint_in_upstreams_format_is_converted_checked_and_served(shallow_checkpoint, tmp_path, started_backend, image_server):
    checkpoint, model = shallow_checkpoint
    out = tmp_path / "converted"
    result = run_converter(checkpoint, out, "--shallow")
    assert result.returncode == 0, result.stderr
    assert "ONNX Runtime vs PyTorch, max abs difference: features" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["SHA256SUMS", "conversion.json", "decoder.onnx", "encoder.onnx"]
    manifest = json.loads((out / "conversion.json").read_text())
    assert manifest["checkpoint"]["sha256"] == file_sha256(checkpoint)
    for name in ("encoder.onnx", "decoder.onnx"):
        assert manifest["files"][name] == file_sha256(out / name)
        assert f"{manifest['files'][name]}  {name}" in (out / "SHA256SUMS").read_text()
    assert manifest["onnx_vs_pytorch"]["logits_max_abs_diff"] < 1e-3

    # The files hold the checkpoint's weights: the decoder gives the checkpoint's model's logits on new inputs.
    _, (features, coords, labels, prev_mask) = example_inputs(model.cfg, num_points=2, seed=11)
    with torch.no_grad():
        expected = SegNextDecoder(model)(features, coords, labels, prev_mask).numpy()
    decoder = ort.InferenceSession(str(out / "decoder.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"image_feats": features.numpy(), "point_coords": coords.numpy(), "point_labels": labels.numpy(), "prev_mask": prev_mask.numpy()}
    assert np.abs(decoder.run(["mask"], feeds)[0] - expected).max() < 1e-3

    # The backend serves them as they are, without downloading anything.
    url = started_backend(MODEL_DIR=str(out), MODEL_URL="", LABEL_STUDIO_URL=image_server.url)
    health = requests.get(url + "/health", timeout=30).json()
    assert health["demo"] is False
    assert {role: info["sha256"] for role, info in health["models"].items()} == {
        "encoder": manifest["files"]["encoder.onnx"], "decoder": manifest["files"]["decoder.onnx"]
    }
    scene = make_scene(640, 480)
    path = image_server.add("/data/upload/1/converted.png", encode_png(scene.pixels))
    response = requests.post(url + "/predict", json=predict_body(path, [click_on(scene, 0)]), timeout=600)
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["model_version"]


def test_a_bare_state_dict_in_half_precision_is_accepted(shallow_checkpoint, tmp_path):
    _, model = shallow_checkpoint
    path = tmp_path / "bare.pth"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    converted = build_model(load_checkpoint(path), SegNextConfig.shallow())
    weight = converted.head.seg_conv.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, model.head.seg_conv.weight.half().float())


def test_missing_and_unexpected_keys_are_listed(shallow_checkpoint, tmp_path):
    _, model = shallow_checkpoint
    state = model.state_dict()
    del state["head.seg_conv.bias"], state["neck.down_4.6.weight"]
    state["module.extra.weight"] = torch.zeros(3)
    path = tmp_path / "keys.pth"
    torch.save({"state_dict": state, "config": upstream_config(model.cfg)}, path)
    with pytest.raises(CheckpointError) as error:
        build_model(load_checkpoint(path), SegNextConfig.shallow())
    message = str(error.value)
    assert "2 missing key(s): head.seg_conv.bias, neck.down_4.6.weight" in message
    assert "1 unexpected key(s): module.extra.weight" in message


@pytest.mark.parametrize(
    "name, cfg, fragments",
    [
        (
            "ViT-L",
            SegNextConfig(embed_dim=1024, num_heads=16, mlp_hidden=4096, encoder_depth=24, global_block_indices=(5, 11, 17, 23)),
            ["embedding width 1024 (ViT-L)", "24 backbone blocks (ViT-L)", "MLP width 4096"],
        ),
        (
            "ViT-H",
            SegNextConfig(embed_dim=1280, num_heads=16, mlp_hidden=5120, encoder_depth=32, global_block_indices=(7, 15, 23, 31)),
            ["embedding width 1280 (ViT-H)", "32 backbone blocks (ViT-H)"],
        ),
        ("SAx1", SegNextConfig(num_fusion_blocks=1), ["1 fusion blocks (SAx1); SegNext ViT-B SAx2 has 2"]),
    ],
)
def test_other_architectures_are_refused_naming_what_was_found(name, cfg, fragments, tmp_path):
    path = tmp_path / f"{name}.pth"
    torch.save({"state_dict": shapes_only(cfg), "config": upstream_config(cfg)}, path)
    result = run_converter(path, tmp_path / "out") if name == "ViT-L" else None  # the command line once
    if result is not None:
        assert result.returncode == 1 and not (tmp_path / "out" / "encoder.onnx").exists()
        message = result.stderr
    else:
        with pytest.raises(CheckpointError) as error:
            build_model(load_checkpoint(path), SegNextConfig())
        message = str(error.value)
    assert "is not SegNext ViT-B SAx2" in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_config_with_other_attention_heads_is_refused(tmp_path):
    cfg = SegNextConfig()
    config = upstream_config(cfg)
    config["params"]["backbone_params"]["value"]["num_heads"] = 8
    path = tmp_path / "heads.pth"
    torch.save({"state_dict": shapes_only(cfg), "config": config}, path)
    with pytest.raises(CheckpointError, match="backbone num_heads 8; SegNext ViT-B SAx2 has 12"):
        build_model(load_checkpoint(path), cfg)


class RunsCode:
    """A pickle that would run a command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_files_that_are_not_checkpoints_are_refused_and_no_code_is_run(tmp_path):
    marker = tmp_path / "code-was-run"
    hostile = tmp_path / "hostile.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": RunsCode(marker)}, hostile)
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        load_checkpoint(hostile)
    assert not marker.exists()

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    a_list = tmp_path / "list.pth"
    torch.save([1, 2, 3], a_list)
    plain_pickle = tmp_path / "plain.pkl"
    plain_pickle.write_bytes(pickle.dumps({"state_dict": {}}))
    other_dict = tmp_path / "other.pth"
    torch.save({"epoch": 3, "optimizer": {}}, other_dict)
    for path, fragment in [
        (text, "is not a PyTorch checkpoint"),
        (a_list, "neither a state dict"),
        (plain_pickle, "is not a PyTorch checkpoint"),
        (other_dict, "the state dict has entries that are not named tensors"),
        (tmp_path / "missing.pth", "no such file"),
    ]:
        with pytest.raises(CheckpointError, match=fragment):
            load_checkpoint(path)
