"""Export SegNext ViT-B SAx2-sized ONNX models with random weights, for timing the backend.

    python -m tools.build_benchmark_models OUT_DIR [--shallow] [--object-like] [--seed N] [--benchmark]

Writes OUT_DIR/encoder.onnx and OUT_DIR/decoder.onnx with the same names, shapes and dtypes as the
published pair (see docs/segnext.md): opset 17, float32, weights inside the .onnx files, the
click count `num_points` the only dynamic axis.  --shallow builds the cheap test variant (2 encoder blocks,
1 fusion block).  --benchmark then times both models with ONNX Runtime on the CPU.

--object-like rescales a few weights of the random model (`make_object_like_`) so that its masks are
object-like regions that follow the image instead of pixel noise: what measuring mask agreement between a
float32 model and a faster variant of it (tools/quantize.py) needs. The architecture and the amount of
arithmetic are unchanged, so its timings are those of the plain benchmark models.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from tools.segnext_arch import (
    EXPECTED_PARAMS_M,
    SegNextConfig,
    SegNextDecoder,
    SegNextEncoder,
    SegNextModel,
)

OPSET = 17
PROTOBUF_LIMIT = 2**31  # a single ONNX protobuf file cannot exceed 2 GB

ENCODER_INPUTS = ["image"]
ENCODER_OUTPUTS = ["image_feats"]
DECODER_INPUTS = ["image_feats", "point_coords", "point_labels", "prev_mask"]
DECODER_OUTPUTS = ["mask"]
DECODER_DYNAMIC_AXES = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}


def example_inputs(cfg: SegNextConfig, num_points: int = 1, seed: int = 0):
    """Plausible inputs: an image in [0, 1], features, clicks inside the frame, a probability prev_mask."""
    g = torch.Generator().manual_seed(seed)
    s, grid = cfg.image_size, cfg.grid_size
    image = torch.rand(1, 3, s, s, generator=g)
    image_feats = torch.randn(1, cfg.embed_dim, grid, grid, generator=g)
    point_coords = torch.rand(1, num_points, 2, generator=g) * (s - 1)
    # First click positive, then alternate, so N >= 2 exercises both polarities.
    point_labels = torch.tensor([[1.0 if i % 2 == 0 else 0.0 for i in range(num_points)]])
    prev_mask = torch.rand(1, 1, s, s, generator=g)
    return image, (image_feats, point_coords, point_labels, prev_mask)


OBJECT_LIKE_SCALE = 100.0


@torch.no_grad()
def make_object_like_(model: SegNextModel, images: list[torch.Tensor], scale: float = OBJECT_LIKE_SCALE) -> float:
    """Turn random weights into a model whose masks are object-like regions; returns the bias shift.

    Random weights give logits that are O(0.1) noise, fine at the stride-4 level: masks look like static, and
    how much such a mask moves under a faster variant says little about a trained model's. So:
    - the head's stride-4 and stride-8 inputs are zeroed (their 1x1 convs give 0 after the ReLU): the logits
      come from the stride-16 and stride-32 maps and form regions of the image, not pixel noise;
    - the click channels of the prompt embedding are scaled by `scale`, so clicks weigh on the tokens as much
      as the image does, as in a trained model;
    - the final 1x1 convolution is scaled by `scale` (logits of tens, sigmoids near 0 or 1, so the
      probability fed back as prev_mask is a near-binary mask, as a trained model's is) and its bias shifted
      so that the median logit over `images` (one positive click at the centre each) is 0.
    The computation (every layer, its shapes) is unchanged: only weight values move.
    """
    head = model.head
    for level in (0, 1):  # strides 4 and 8
        head.convs[level].conv.weight.zero_()
        head.convs[level].conv.bias.zero_()
    model.visual_prompts_encoder.proj.weight[:, 1:3] *= scale  # channels: prev_mask, positive, negative
    head.seg_conv.weight *= scale
    head.seg_conv.bias *= scale
    encoder, decoder = SegNextEncoder(model).eval(), SegNextDecoder(model).eval()
    size = model.cfg.image_size
    centre = torch.tensor([[[size / 2, size / 2]]])
    medians = [
        decoder(encoder(image), centre, torch.ones(1, 1), torch.zeros(1, 1, size, size)).median()
        for image in images
    ]
    shift = float(torch.stack(medians).median())
    head.seg_conv.bias -= shift
    return shift


def object_like_calibration_images(count: int = 2, size: int = 1024) -> list[torch.Tensor]:
    """Photo-like synthetic images (tools.scenes.natural_image), as 1x3xSxS tensors in [0, 1]."""
    from tools.scenes import natural_image

    return [
        torch.from_numpy(natural_image(size, size, seed=100 + i)).permute(2, 0, 1)[None].float() / 255
        for i in range(count)
    ]


def _export_atomic(module: torch.nn.Module, args: tuple, path: Path, **kwargs) -> None:
    """Export to a temporary file beside `path`, then rename: a reader never sees a half-written model."""
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    if n_bytes >= PROTOBUF_LIMIT:
        # Cannot happen for SegNext ViT-B (~340 + ~100 MB); external data would need a different layout.
        raise RuntimeError(f"{path.name}: {n_bytes / 1e9:.2f} GB of weights exceeds the 2 GB protobuf limit")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo=True; the warning is expected noise.
            warnings.simplefilter("ignore", DeprecationWarning)
            # GroupNorm's Python-side batch-size check trips the tracer; shapes are static by design.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.functional")
            torch.onnx.export(
                module,
                args,
                str(tmp),
                opset_version=OPSET,
                # The TorchScript exporter: needs no onnxscript and writes one self-contained file.
                dynamo=False,
                do_constant_folding=True,
                **kwargs,
            )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_models(model: SegNextModel, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    image, dec_args = example_inputs(model.cfg, num_points=2)
    enc_path, dec_path = out_dir / "encoder.onnx", out_dir / "decoder.onnx"
    _export_atomic(
        SegNextEncoder(model).eval(),
        (image,),
        enc_path,
        input_names=ENCODER_INPUTS,
        output_names=ENCODER_OUTPUTS,
    )
    _export_atomic(
        SegNextDecoder(model).eval(),
        dec_args,
        dec_path,
        input_names=DECODER_INPUTS,
        output_names=DECODER_OUTPUTS,
        dynamic_axes=DECODER_DYNAMIC_AXES,
    )
    return enc_path, dec_path


def report_param_counts(model: SegNextModel) -> bool:
    """Print parameters per part next to docs/segnext.md's figures; True when all are within 1 %."""
    ok = True
    print(f"{'part':<18}{'params':>14}{'M':>9}{'segnext.md':>12}{'diff':>9}")
    for part, n in model.param_counts().items():
        expected = EXPECTED_PARAMS_M[part]
        rel = (n / 1e6 - expected) / expected
        ok &= abs(rel) <= 0.01
        print(f"{part:<18}{n:>14,}{n / 1e6:>9.2f}{expected:>12.2f}{rel:>+9.2%}")
    return ok


def benchmark(enc_path: Path, dec_path: Path, cfg: SegNextConfig, threads: int, runs: int) -> None:
    """Median wall time of `runs` runs after one warm-up, CPUExecutionProvider, default session options
    apart from the thread count."""
    import onnxruntime as ort

    def session(path: Path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def timed(sess, feeds) -> float:
        sess.run(None, feeds)  # warm-up: first run allocates arenas and picks kernels
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feeds)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    image, (_, coords, labels, prev) = example_inputs(cfg, num_points=1)
    enc = session(enc_path)
    feats = enc.run(None, {"image": image.numpy()})[0]
    t_enc = timed(enc, {"image": image.numpy()})
    del enc
    dec = session(dec_path)
    feeds = {
        "image_feats": feats,
        "point_coords": coords.numpy(),
        "point_labels": labels.numpy(),
        "prev_mask": prev.numpy(),
    }
    t_dec = timed(dec, feeds)
    print(f"onnxruntime CPU, {threads} threads, median of {runs} after warm-up:")
    print(f"  encoder            {t_enc:.2f} s")
    print(f"  decoder (1 click)  {t_dec:.2f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--shallow", action="store_true", help="2 encoder blocks, 1 fusion block (for tests)")
    ap.add_argument("--object-like", action="store_true", help="rescale weights so masks are object-like regions")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--benchmark", action="store_true", help="time the exported models with onnxruntime")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for --benchmark")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per model for --benchmark")
    args = ap.parse_args(argv)

    cfg = SegNextConfig.shallow() if args.shallow else SegNextConfig()
    model = SegNextModel(cfg, seed=args.seed)
    if not report_param_counts(model) and not args.shallow:
        print("error: parameter counts differ from docs/segnext.md by more than 1 %", file=sys.stderr)
        return 1
    if args.object_like:
        size = model.cfg.image_size
        shift = make_object_like_(model, object_like_calibration_images(size=size))
        print(f"object-like: stride-4/8 head inputs zeroed, clicks and logits x{OBJECT_LIKE_SCALE:g}, bias {-shift:+.3f}")
    t0 = time.perf_counter()
    enc_path, dec_path = export_models(model, args.out_dir)
    print(f"exported in {time.perf_counter() - t0:.0f} s:")
    for p in (enc_path, dec_path):
        print(f"  {p}  {p.stat().st_size / 1e6:.1f} MB")
    if args.benchmark:
        del model  # free ~450 MB of PyTorch weights before onnxruntime loads its own copy
        benchmark(enc_path, dec_path, cfg, args.threads, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
