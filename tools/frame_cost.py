"""What one click's mask work costs by the shape of its frame: thin frames against a square one.

    python -m tools.frame_cost [--shapes 10000x10000,1x100000000,100000000x1] [--polygons]

For each frame (width x height), in a fresh process: smooth object-like 1024x1024 logits, then what a click
does after its decoder run: the mask at the frame's size (resize + threshold), the next click's `prev_mask`
round trip, and the brush RLE (with --polygons, the polygons instead). Prints the seconds and the peak memory
the work added (VmHWM reset before it, less the RSS before it), side by side with the first shape's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(width: int, height: int, polygons: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    from segnext_backend.geometry import ModelFrame
    from segnext_backend.masks import logits_to_mask, mask_to_rle, sigmoid
    from segnext_backend.polygons import mask_polygons

    y, x = np.mgrid[0:1024, 0:1024].astype(np.float32)
    logits = 8.0 - np.hypot(x - 400, y - 600) / 30 + 2 * np.sin(x / 40) * np.cos(y / 55)
    frame = ModelFrame(width, height)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    started = time.perf_counter()
    mask = logits_to_mask(logits, frame, 0.49).mask
    frame.through_frame(logits, sigmoid)
    size = len(mask_polygons(mask, 1.5, 25.0)) if polygons else len(mask_to_rle(mask))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "peak_mb": (_rss_kib("VmHWM") - before) / 1024, "answer_size": size}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="10000x10000,1x100000000,100000000x1")
    parser.add_argument("--polygons", action="store_true", help="answer polygons instead of the brush RLE")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one shape
    args = parser.parse_args(argv)
    if args.one:
        width, height = (int(v) for v in args.one.split("x"))
        print(json.dumps(measure(width, height, args.polygons)))
        return 0
    rows = []
    for shape in args.shapes.split(","):
        command = [sys.executable, "-m", "tools.frame_cost", "--one", shape] + (["--polygons"] if args.polygons else [])
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{shape}: failed: {result.stderr.strip()[-300:]}")
            continue
        rows.append((shape, json.loads(result.stdout)))
    if not rows:
        return 1
    base = rows[0][1]
    print(f"| frame | seconds | peak MB added | {'polygons' if args.polygons else 'RLE bytes'} | time vs {rows[0][0]} | memory vs {rows[0][0]} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for shape, row in rows:
        print(f"| {shape} | {row['seconds']:.2f} | {row['peak_mb']:.0f} | {row['answer_size']} | "
              f"{row['seconds'] / base['seconds']:.1f}x | {row['peak_mb'] / max(base['peak_mb'], 1):.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
