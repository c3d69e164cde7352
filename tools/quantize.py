"""Dynamic int8 quantisation of SegNext's MatMul/Gemm weights, and how it compares with fp32.

    python -m tools.quantize MODEL_DIR                 # writes encoder.int8.onnx and decoder.int8.onnx
    python -m tools.quantize MODEL_DIR --compare       # then times both pairs and compares their masks

Off by default: the backend serves encoder.onnx / decoder.onnx. The int8 files have the same interface
(float32 inputs and outputs; only the weights of MatMul and Gemm are int8, activations are quantised on the
fly per run), so `SegNextEngine(MODEL_DIR / "encoder.int8.onnx", MODEL_DIR / "decoder.int8.onnx")` serves them.

--compare reports the speed-up and the mask IoU between fp32 and int8 over clicks on photo-like synthetic
images. On the random-weight benchmark models that agreement says little about SegNext's real accuracy:
random weights give noise-like masks whose sensitivity to weight rounding differs from a trained model's.
Re-run it on the real model files (and ideally on DAVIS/HQSeg images) before turning int8 on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OP_TYPES = ["MatMul", "Gemm"]


def int8_path(path: Path) -> Path:
    return path.with_name(path.stem + ".int8.onnx")


def quantize_model(source: Path, target: Path | None = None) -> Path:
    """Write the int8 version of one ONNX file (MatMul/Gemm weights int8, per channel off, QUInt8 activations)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = target or int8_path(source)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        quantize_dynamic(str(source), str(tmp), op_types_to_quantize=OP_TYPES, weight_type=QuantType.QInt8)
        tmp.replace(target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def quantize_pair(model_dir: Path) -> tuple[Path, Path]:
    return quantize_model(model_dir / "encoder.onnx"), quantize_model(model_dir / "decoder.onnx")


def compare(model_dir: Path, images: int = 2, clicks: int = 3, threads: int = 0) -> None:
    from segnext_backend.engine import SegNextEngine
    from segnext_backend.geometry import ModelFrame, to_model_input
    from segnext_backend.masks import logits_to_mask, sigmoid
    from tools.benchmark import natural_image

    fp32 = SegNextEngine(model_dir / "encoder.onnx", model_dir / "decoder.onnx", intra_op_threads=threads)
    int8 = SegNextEngine(*(int8_path(model_dir / f"{r}.onnx") for r in ("encoder", "decoder")), intra_op_threads=threads)
    sizes = {
        role: (
            (model_dir / f"{role}.onnx").stat().st_size / 1e6,
            int8_path(model_dir / f"{role}.onnx").stat().st_size / 1e6,
        )
        for role in ("encoder", "decoder")
    }
    rng = np.random.default_rng(0)
    times = {"fp32": {"encoder": [], "decoder": []}, "int8": {"encoder": [], "decoder": []}}
    ious, max_prob_diff = [], []
    frame = ModelFrame(1024, 1024)
    for index in range(images):
        model_input = to_model_input(natural_image(1024, 1024, seed=10 + index))
        points = rng.uniform(100, 924, size=(clicks, 2)).round().astype(np.float32)
        labels = (np.arange(clicks) % 3 != 2).astype(np.float32)  # mostly positive, every third negative
        states = {}
        for name, engine in (("fp32", fp32), ("int8", int8)):
            started = time.perf_counter()
            features = engine.encode(model_input)
            times[name]["encoder"].append(time.perf_counter() - started)
            prev = np.zeros((1024, 1024), np.float32)
            masks = []
            for k in range(1, clicks + 1):
                started = time.perf_counter()
                logits = engine.decode(features, points[:k], labels[:k], prev)
                times[name]["decoder"].append(time.perf_counter() - started)
                prev = sigmoid(logits)
                masks.append((logits_to_mask(logits, frame, 0.49).mask, prev))
            states[name] = masks
        for (mask32, prob32), (mask8, prob8) in zip(states["fp32"], states["int8"]):
            union = np.logical_or(mask32, mask8).sum()
            ious.append(float(np.logical_and(mask32, mask8).sum() / union) if union else 1.0)
            max_prob_diff.append(float(np.abs(prob32 - prob8).max()))

    print("| model | fp32 size | int8 size | fp32 run (median) | int8 run (median) | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for role in ("encoder", "decoder"):
        t32, t8 = statistics.median(times["fp32"][role]), statistics.median(times["int8"][role])
        print(
            f"| {role} | {sizes[role][0]:.0f} MB | {sizes[role][1]:.0f} MB | {t32 * 1000:,.0f} ms | {t8 * 1000:,.0f} ms "
            f"| {t32 / t8:.2f} x |"
        )
    print(
        f"\nmask IoU int8 vs fp32 over {len(ious)} clicks ({images} images x {clicks} clicks, fed back as upstream does): "
        f"median {statistics.median(ious):.3f}, min {min(ious):.3f}; max |probability difference| "
        f"median {statistics.median(max_prob_diff):.3f}"
    )
    print("(random-weight models: this agreement is a weak proxy for a trained model's; see the module docstring)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="folder with encoder.onnx and decoder.onnx")
    parser.add_argument("--compare", action="store_true", help="time fp32 vs int8 and compare their masks")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    for path in quantize_pair(args.model_dir):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.compare:
        compare(args.model_dir, args.images, args.clicks, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
