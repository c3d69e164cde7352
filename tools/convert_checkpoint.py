"""Turn a SegNext PyTorch checkpoint into the two ONNX files this backend serves.

    python -m tools.convert_checkpoint CHECKPOINT OUT_DIR

CHECKPOINT is a `.pth` saved by upstream SegNext's training code (a dict with `state_dict` and `config`, like
the authors' `vitb_sa2_cocolvis_hq44k_epoch_0.pth`) or a bare state dict, of SegNext ViT-B SAx2: the model the
backend serves (docs/segnext.md). The checkpoint is read with `torch.load(weights_only=True)`: a checkpoint is
a pickle, and no code from it is ever run. It is refused, with a message saying why, when it is not a
checkpoint, when it is another architecture (ViT-L/H, SAx1: the dimensions and blocks found are named), or
when keys are missing or unexpected (listed).

The weights are loaded into `tools/segnext_arch.py` (upstream's layout, key for key) and exported with the
published interface (opset 17, `num_points` dynamic) by `tools/build_benchmark_models.py`'s export. Both
files are then checked against the PyTorch forward on sample inputs (the max differences are printed) and
only then moved into OUT_DIR, each by an atomic rename, with `conversion.json` (the SHA-256 of both files and
of the checkpoint, the differences measured) and `SHA256SUMS` (`sha256sum -c` format). Serve them with
`MODEL_DIR=OUT_DIR MODEL_URL= bash scripts/serve.sh`.

--shallow converts the cheap test variant instead (2 encoder blocks, 1 fusion block; build_benchmark_models
--shallow), so that tests can convert a checkpoint in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from segnext_backend.model_files import file_sha256
from tools.build_benchmark_models import OPSET, example_inputs, export_models
from tools.segnext_arch import SegNextConfig, SegNextDecoder, SegNextEncoder, SegNextModel

MODEL_NAME = "SegNext ViT-B SAx2"
# Widths and depths of the other published backbones, to name what a refused checkpoint is.
VIT_BY_WIDTH = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}
VIT_BY_DEPTH = {12: "ViT-B", 24: "ViT-L", 32: "ViT-H"}
KEYS_LISTED = 20  # the rest are counted
# ONNX Runtime vs PyTorch on the CPU, relative to the largest magnitude of the PyTorch output: float32
# rounding in different kernels is ~1e-6 of it; a wrong graph or wrong weights are far beyond 1e-3.
FEATURES_TOLERANCE = 1e-4
LOGITS_TOLERANCE = 1e-3


class CheckpointError(Exception):
    """The checkpoint cannot be converted; the message says why, for a person."""


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: dict | None  # upstream's serialised model config, when the file has one


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint without running code from it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch wraps the reason in paragraphs of advice (among them: load with weights_only=False, which is
        # what must not happen); keep the reason.
        paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
        reason = next((p for p in paragraphs if "GLOBAL" in p or "Unsupported" in p), paragraphs[-1] if paragraphs else "")
        if "GLOBAL" in reason:
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain containers, so it was not loaded "
                f"(loading them would run code from the file): {reason}"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({reason})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, IndexError) as error:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(error).__name__}: {error})") from None
    config = None
    if isinstance(loaded, Mapping) and "state_dict" in loaded:
        state_dict, config = loaded["state_dict"], loaded.get("config")
    else:
        state_dict = loaded
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointError(
            f"{path} is neither a state dict nor a dict with a 'state_dict' (upstream's format); found "
            + (f"a dict with keys {sorted(map(str, loaded))[:KEYS_LISTED]}" if isinstance(loaded, Mapping) else type(loaded).__name__)
        )
    not_tensors = [str(k) for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: the state dict has entries that are not named tensors: {not_tensors[:KEYS_LISTED]}")
    return Checkpoint(state_dict=dict(state_dict), config=config if isinstance(config, Mapping) else None)


def _block_count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for key in state_dict if (m := pattern.match(key))})


def architecture_problems(state_dict: Mapping[str, torch.Tensor], cfg: SegNextConfig) -> list[str]:
    """What the checkpoint's shapes say differs from the architecture `cfg` (empty: the same)."""
    problems = []
    patch = state_dict.get("backbone.patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        width, kernel = int(patch.shape[0]), int(patch.shape[-1])
        if width != cfg.embed_dim:
            name = VIT_BY_WIDTH.get(width, "not a published SegNext backbone")
            problems.append(f"embedding width {width} ({name}); {MODEL_NAME} has {cfg.embed_dim}")
        if kernel != cfg.patch_size:
            problems.append(f"patch size {kernel}; {MODEL_NAME} has {cfg.patch_size}")
    blocks = _block_count(state_dict, "backbone.blocks.")
    if blocks and blocks != cfg.encoder_depth:
        name = VIT_BY_DEPTH.get(blocks, "not a published SegNext backbone")
        problems.append(f"{blocks} backbone blocks ({name}); {MODEL_NAME} has {cfg.encoder_depth}")
    fusion = _block_count(state_dict, "fusion_blocks.")
    if any(key.startswith("backbone.") for key in state_dict) and fusion != cfg.num_fusion_blocks:
        name = f"SAx{fusion}" if fusion else "no self-attention fusion"
        problems.append(f"{fusion} fusion blocks ({name}); {MODEL_NAME} has {cfg.num_fusion_blocks}")
    fc1 = state_dict.get("backbone.blocks.0.mlp.fc1.weight")
    if fc1 is not None and fc1.ndim == 2 and int(fc1.shape[0]) != cfg.mlp_hidden:
        problems.append(f"MLP width {int(fc1.shape[0])}; {MODEL_NAME} has {cfg.mlp_hidden}")
    return problems


def config_problems(config: Mapping | None, cfg: SegNextConfig) -> list[str]:
    """What upstream's serialised config says differs from `cfg`, for what the weights' shapes cannot tell
    (attention heads, which blocks attend globally, the click disks). Values it does not hold are not checked."""

    def mapping(value) -> Mapping:
        return value if isinstance(value, Mapping) else {}

    params = mapping(mapping(config).get("params"))

    def value(name):
        return mapping(params.get(name)).get("value")

    backbone, fusion = mapping(value("backbone_params")), mapping(value("fusion_params"))
    fusion_block = mapping(fusion.get("params"))
    checks = [
        ("backbone num_heads", backbone.get("num_heads"), cfg.num_heads),
        # Block i attends globally where (i + 1) % global_atten_freq == 0: indices 2, 5, 8, 11 for ViT-B.
        ("backbone global_atten_freq", backbone.get("global_atten_freq"), cfg.global_block_indices[0] + 1),
        ("fusion type", fusion.get("type"), "self_attention"),
        ("fusion num_heads", fusion_block.get("num_heads"), cfg.num_heads),
        ("norm_radius", value("norm_radius"), cfg.click_radius),
        ("use_disks", value("use_disks"), True),
    ]
    return [f"{name} {found!r}; {MODEL_NAME} has {want!r}" for name, found, want in checks if found is not None and found != want]


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - KEYS_LISTED} more" if len(keys) > KEYS_LISTED else ""
    return ", ".join(keys[:KEYS_LISTED]) + more


def build_model(checkpoint: Checkpoint, cfg: SegNextConfig, source: str = "the checkpoint") -> SegNextModel:
    """The checkpoint's weights in `tools/segnext_arch.SegNextModel`, or a CheckpointError saying what differs."""
    state_dict = checkpoint.state_dict
    problems = architecture_problems(state_dict, cfg) + config_problems(checkpoint.config, cfg)
    if problems:
        raise CheckpointError(f"{source} is not {MODEL_NAME}, the model this backend serves: found " + "; ".join(problems))
    with torch.device("meta"):  # shapes only: the checkpoint's tensors become the parameters below
        model = SegNextModel(cfg, seed=None)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    wrong_shape = [
        f"{key} {tuple(state_dict[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in sorted(expected.keys() & state_dict.keys())
        if state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} key(s) of another shape: {_listed(wrong_shape)}")
        raise CheckpointError(f"{source} does not match {MODEL_NAME}'s {len(expected)} keys: " + "; ".join(parts))
    floats = {key: tensor.float().contiguous() for key, tensor in state_dict.items()}  # fp16/bf16 checkpoints too
    model.load_state_dict(floats, strict=True, assign=True)
    return model.eval()


def compare_with_pytorch(model: SegNextModel, encoder_path: Path, decoder_path: Path) -> dict:
    """Max abs differences between ONNX Runtime and the PyTorch forward on sample inputs (1 and 3 clicks)."""
    import onnxruntime as ort

    def session(path):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    encoder, decoder = session(encoder_path), session(decoder_path)
    report = {"features_max_abs_diff": 0.0, "logits_max_abs_diff": 0.0, "features_max_abs": 0.0, "logits_max_abs": 0.0}
    for seed, num_points in ((1, 1), (2, 3)):
        image, (_, coords, labels, prev_mask) = example_inputs(model.cfg, num_points=num_points, seed=seed)
        with torch.no_grad():
            features = SegNextEncoder(model)(image)
            logits = SegNextDecoder(model)(features, coords, labels, prev_mask)
        onnx_features = encoder.run(["image_feats"], {"image": image.numpy()})[0]
        feeds = {"image_feats": features.numpy(), "point_coords": coords.numpy(), "point_labels": labels.numpy(), "prev_mask": prev_mask.numpy()}
        onnx_logits = decoder.run(["mask"], feeds)[0]
        for name, ours, reference in (("features", onnx_features, features), ("logits", onnx_logits, logits)):
            reference = reference.numpy()
            report[f"{name}_max_abs_diff"] = max(report[f"{name}_max_abs_diff"], float(abs(ours - reference).max()))
            report[f"{name}_max_abs"] = max(report[f"{name}_max_abs"], float(abs(reference).max()))
    return report


def convert(checkpoint_path: Path, out_dir: Path, cfg: SegNextConfig | None = None, log=print) -> dict:
    """Convert, check and write; returns what conversion.json holds. Raises CheckpointError."""
    cfg = cfg or SegNextConfig()
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint, cfg, source=str(checkpoint_path))
    log(f"{checkpoint_path}: {len(checkpoint.state_dict)} tensors, {MODEL_NAME}" + (" (shallow test variant)" if cfg != SegNextConfig() else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(out_dir) / f".convert-{os.getpid()}"
    staging.mkdir()
    try:
        encoder, decoder = export_models(model, staging)
        differences = compare_with_pytorch(model, encoder, decoder)
        log(
            "ONNX Runtime vs PyTorch, max abs difference: features {features_max_abs_diff:.2e} (of values up to "
            "{features_max_abs:.3g}), logits {logits_max_abs_diff:.2e} (of values up to {logits_max_abs:.3g})".format(**differences)
        )
        for name, tolerance in (("features", FEATURES_TOLERANCE), ("logits", LOGITS_TOLERANCE)):
            limit = tolerance * max(1.0, differences[f"{name}_max_abs"])
            if not differences[f"{name}_max_abs_diff"] <= limit:
                raise CheckpointError(f"the exported {name} differ from PyTorch's by more than {limit:.2e}: nothing written")
        manifest = {
            "model": MODEL_NAME,
            "checkpoint": {"file": checkpoint_path.name, "sha256": file_sha256(checkpoint_path), "tensors": len(checkpoint.state_dict)},
            "files": {path.name: file_sha256(path) for path in (encoder, decoder)},
            "opset": OPSET,
            "onnx_vs_pytorch": differences,
        }
        sums = "".join(f"{digest}  {name}\n" for name, digest in manifest["files"].items())
        (staging / "conversion.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (staging / "SHA256SUMS").write_text(sums)
        # Each file appears whole or not at all; the manifest last, once both model files are in place.
        for name in ("encoder.onnx", "decoder.onnx", "SHA256SUMS", "conversion.json"):
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name, digest in manifest["files"].items():
        log(f"  {out_dir / name}  sha256 {digest}")
    log(f"  checkpoint sha256 {manifest['checkpoint']['sha256']}")
    log(f"serve them with: MODEL_DIR={out_dir} MODEL_URL= bash scripts/serve.sh")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="the .pth file (upstream's format or a bare state dict)")
    parser.add_argument("out_dir", type=Path, help="where encoder.onnx and decoder.onnx are written")
    parser.add_argument("--shallow", action="store_true", help="the shallow test variant (2 encoder blocks, 1 fusion block)")
    args = parser.parse_args(argv)
    try:
        convert(args.checkpoint, args.out_dir, SegNextConfig.shallow() if args.shallow else SegNextConfig())
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
