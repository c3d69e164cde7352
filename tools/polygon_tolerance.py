"""Vertices against fidelity for the polygon simplification tolerance (POLYGON_TOLERANCE).

    python -m tools.polygon_tolerance [--tolerances 0 0.5 1 1.5 2 3]

For each tolerance: the polygons of the test scenes' objects (tools.scenes, at three sizes) and of a 12 MP
mask made the backend's way (smooth object-like 1024x1024 logits resized and thresholded by
`masks.logits_to_mask`), then rasterised back at the original size with Pillow (`ImageDraw.polygon`, as a
consumer of the exported polygons would) and compared with the mask: IoU, and the vertices per polygon; and the
IoU of the pixels whose centres the polygons hold (`pixel_centre_mask`), which leaves out Pillow's boundary rule
and measures the simplification alone. Prints a markdown table (minimum IoU over the scenes' objects, median
vertices) and the time of `mask_polygons` on the 12 MP mask.
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

from segnext_backend.geometry import ModelFrame  # noqa: E402
from segnext_backend.masks import logits_to_mask  # noqa: E402
from segnext_backend.polygons import mask_polygons, to_percent  # noqa: E402
from tools.scenes import iou, make_scene, pillow_polygon_mask, pixel_centre_mask  # noqa: E402

MIN_AREA = 0  # every part, so that the table measures the tolerance alone


def smooth_mask(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A mask as the backend makes one from the decoder's logits: smooth blobs, resized from 1024x1024."""
    from tools.benchmark import smooth_logits

    return logits_to_mask(smooth_logits(seed), ModelFrame(width, height), 0.49).mask


def read_back(mask: np.ndarray, tolerance: float) -> tuple[float, float, list[int]]:
    """IoU with the mask read back by Pillow, and by pixel centres; vertices of each polygon."""
    height, width = mask.shape
    polygons = mask_polygons(mask, tolerance, MIN_AREA)
    regions = [{"value": {"points": to_percent(p, width, height)}} for p in polygons]
    pillow = iou(pillow_polygon_mask(regions, width, height), mask)
    return pillow, iou(pixel_centre_mask(polygons, width, height), mask), [len(p) for p in polygons]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0, 0.5, 1, 1.5, 2, 3])
    args = parser.parse_args(argv)

    scenes = [make_scene(640, 480, seed=1), make_scene(1600, 1000, seed=2), make_scene(4000, 3000, seed=3)]
    scene_masks = [obj for s in scenes for obj in s.objects]
    big = smooth_mask(4000, 3000)

    print(
        "| tolerance (px) | scenes: min IoU, Pillow | scenes: min IoU, centres | scenes: median vertices "
        "| 12 MP: IoU, Pillow | 12 MP: IoU, centres | 12 MP: vertices (3 parts) | 12 MP: ms |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tolerance in args.tolerances:
        pillow_ious, centre_ious, vertices = [], [], []
        for mask in scene_masks:
            pillow, centres, counts = read_back(mask, tolerance)
            pillow_ious.append(pillow)
            centre_ious.append(centres)
            vertices.extend(counts)
        big_pillow, big_centres, big_counts = read_back(big, tolerance)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            mask_polygons(big, tolerance, MIN_AREA)
            times.append(time.perf_counter() - started)
        print(
            f"| {tolerance:g} | {min(pillow_ious):.4f} | {min(centre_ious):.4f} | {statistics.median(vertices):,.0f} "
            f"| {big_pillow:.4f} | {big_centres:.4f} | "
            f"{', '.join(f'{c:,}' for c in big_counts)} | {statistics.median(times) * 1000:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
