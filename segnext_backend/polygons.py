"""From an object mask to polygons and a box, in the image's pixels and in Label Studio's percentages.

The outline runs on the pixel edges, not through the pixel centres: pixel (x, y) is the unit square
[x, x+1] x [y, y+1], as Label Studio's canvas draws it over the image. So an outline traced with no
simplification encloses exactly the mask's pixels (its shoelace area is their count), the polygon lies over
the brush mask it came from, and a consumer that rasterises it at the original size gets the mask back up to
its own boundary rule (Pillow's `ImageDraw.polygon` also fills the pixels whose centres lie on the outline).

OpenCV traces pixel centres. Tracing the mask scaled up 2x (nearest) instead and mapping each traced index k
of the scaled-up image back to the pixel-edge coordinate k // 2 gives the edge outline: a pixel's left column
of the scaled-up block is at 2x (edge x), its right one at 2x + 1 (edge x + 1), and the diagonal steps that
8-connected tracing takes around concave corners land both their ends on the same corner.

Label Studio's polygon has no holes. A hole is cut into its part's polygon through a slit of zero width: the
outline goes from its vertex nearest to the hole's top vertex over to that vertex, around the hole the other
way, and back the same way. Filled by the even-odd or the non-zero rule, the hole stays empty and the slit
adds nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import AnswerTooLargeError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Box:
    """The tight box of a mask in pixel edges: columns x0 .. x1 - 1 and rows y0 .. y1 - 1 hold its pixels."""

    x0: int
    y0: int
    x1: int
    y1: int


def bounding_box(mask: np.ndarray) -> Box | None:
    """The box around every pixel of the mask (all its parts); None for an empty mask."""
    columns = np.flatnonzero(mask.any(axis=0))
    if columns.size == 0:
        return None
    # The first and the last row from the first and the last pixel in reading order: `any(axis=1)` would take
    # a step per row (seconds for a frame 1 pixel wide).
    flat = mask.ravel()
    first, last = int(np.argmax(flat)), flat.size - 1 - int(np.argmax(flat[::-1]))
    return Box(int(columns[0]), first // mask.shape[1], int(columns[-1]) + 1, last // mask.shape[1] + 1)


def signed_area(points: np.ndarray) -> float:
    """Shoelace area of a closed polygon (N x 2): positive when it turns clockwise on the image (y down)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _without_redundant_vertices(points: np.ndarray) -> np.ndarray:
    """Drop repeated points and the middle points of straight runs: the same outline with only its corners."""
    keep = np.any(points != np.roll(points, 1, axis=0), axis=1)
    points = points[keep]
    if len(points) < 3:
        return points
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    cross = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - (points[:, 1] - before[:, 1]) * (
        after[:, 0] - points[:, 0]
    )
    # A point where the outline turns back on itself (a pinch between two diagonal pixels) is kept.
    reverses = np.einsum("ij,ij->i", points - before, after - points) < 0
    return points[(cross != 0) | reverses]


def _simplified(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker (OpenCV's approxPolyDP) within `tolerance` pixels; the exact outline if that collapses."""
    if tolerance <= 0 or len(points) <= 4:
        return points
    simple = cv2.approxPolyDP(points.astype(np.float32).reshape(-1, 1, 2), tolerance, True).reshape(-1, 2)
    return simple.astype(np.float64) if len(simple) >= 3 else points


def _with_hole(outline: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """The outline with the hole cut in through a zero-width slit from the hole's top vertex to the outline's
    vertex nearest to it (linear in the vertices: a slit of any length adds nothing to the filled area)."""
    if (signed_area(outline) > 0) == (signed_area(hole) > 0):
        hole = hole[::-1]
    j = int(np.lexsort((hole[:, 0], hole[:, 1]))[0])
    i = int(np.argmin(((outline - hole[j]) ** 2).sum(axis=1)))
    around_hole = np.concatenate([hole[j:], hole[: j + 1]])
    return np.concatenate([outline[: i + 1], around_hole, outline[i:]])


# At most this many polygons are answered (the largest parts), and at most this many holes cut in (the
# largest; the others are filled). A real object has a handful of each; a speckled mask (noise, a hostile
# image) could have hundreds of thousands, each a region for Label Studio to draw and a contour to trace.
MAX_PARTS = 100
MAX_HOLES = 100
# Above this many row-wise in/out transitions in the traced box the mask is taken as speckled, and its small
# parts and holes are removed with connected components before tracing: the tracing, and the work per
# contour after it, grow with the number of contours (~1 s for 10,000). Below it that pass would cost more
# than it saves. Three smooth objects on a 12 MP image have 2,000-5,000 transitions, a 12 MP noise mask
# millions. Either way the answer is the same (tested).
FRAGMENTED_TRANSITIONS = 20_000


# A mask whose exact outline has more corners than this many times MAX_POLYGON_VERTICES is not traced: tracing
# costs about 100 bytes per corner, and a bristly mask (or a frame of 1 x 100,000,000 pixels, read row by row)
# can have one per pixel.
TRACED_CORNERS_PER_VERTEX = 50
# Rows of the mask (times its width) looked at once when counting its corners.
_SCAN_PIXELS = 1 << 22


def outline_corners(mask: np.ndarray) -> int:
    """How many corners the pixel-edge outlines of a mask have (a pinch between two diagonal pixels counts
    twice): what tracing it costs. Counted a band of rows at a time, with no temporary of the mask's size.

    At each corner of the pixel grid, the vertical edge above it (a change between its two upper pixels) and
    the one below differ, or both are there with the diagonal pixels alike (a pinch).
    """
    height, width = mask.shape
    step = max(1, _SCAN_PIXELS // (width + 2))
    corners = 0
    for start in range(-1, height, step):  # the grid rows between mask rows start .. start + step and the next
        count = min(step, height - start)
        rows = np.zeros((count + 1, width + 2), bool)  # mask rows start .. start + count, blank outside
        low, high = max(start, 0), min(start + count + 1, height)
        rows[low - start : high - start, 1:-1] = mask[low:high]
        edges = rows[:, 1:] != rows[:, :-1]
        above, below = edges[:-1], edges[1:]
        pinches = above & below & (rows[:-1, :-1] != rows[1:, :-1])
        corners += int(np.count_nonzero(above != below)) + 2 * int(np.count_nonzero(pinches))
    return corners


def _largest(areas: np.ndarray, min_area: float, limit: int) -> np.ndarray:
    """A bool array over `areas`: those of at least min_area, at most the `limit` largest."""
    keep = areas >= min_area
    if keep.sum() > limit:
        keep[np.argsort(-areas, kind="stable")[limit:]] = False
    return keep


def without_small_pieces(mask: np.ndarray, min_area: float) -> np.ndarray:
    """The mask with its holes under min_area (or past the MAX_HOLES largest) filled, then its parts under
    min_area (or past the MAX_PARTS largest) removed: what `mask_polygons` answers, as a mask."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    # Holes: 4-connected background regions other than the one around the mask (which holds the border).
    count, labels, stats, _ = cv2.connectedComponentsWithStats(1 - padded, connectivity=4)
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
    areas[0] = -np.inf  # label 0 is the mask itself: never background
    areas[labels[0, 0]] = np.inf  # the background around the mask is no hole: always kept
    keep_background = _largest(areas, min_area, MAX_HOLES + 1)
    filled = (~keep_background[labels]).view(np.uint8)
    # Parts: 8-connected, as OpenCV traces them.
    count, labels, stats, _ = cv2.connectedComponentsWithStats(filled, connectivity=8)
    keep_part = np.zeros(count, bool)
    keep_part[1:] = _largest(stats[1:, cv2.CC_STAT_AREA].astype(np.float64), min_area, MAX_PARTS)
    return keep_part[labels][1:-1, 1:-1]


def mask_polygons(
    mask: np.ndarray, tolerance: float, min_area: float, max_vertices: int | None = None
) -> list[np.ndarray]:
    """One polygon per part of the mask (N x 2 float64 pixel-edge coordinates, x then y), largest first.

    Parts whose area (pixels, with the holes that are cut in subtracted) is below `min_area` are left out, and
    holes below it filled; at most MAX_PARTS parts and MAX_HOLES holes, the largest. `tolerance` is
    Douglas-Peucker's in pixels: no vertex of the exact outline is farther than that from the answered one (0:
    the exact outline, every corner of the pixel staircase).

    `max_vertices`: the most vertices answered, all polygons together. An answer with more (a bristly or
    speckled mask: one of 431,200 vertices was seen) is simplified further, the tolerance doubled (from at
    least 1 px) until it fits, and that is logged; one that cannot fit even so raises AnswerTooLargeError,
    and so does, before it is traced, a mask whose outline has more than TRACED_CORNERS_PER_VERTEX corners per
    vertex allowed.
    """
    box = bounding_box(mask)
    if box is None:
        return []
    crop = mask[box.y0 : box.y1, box.x0 : box.x1]
    transitions = np.count_nonzero(crop[:, 1:] != crop[:, :-1])
    if transitions > FRAGMENTED_TRANSITIONS:
        crop = without_small_pieces(crop, min_area)  # fewer transitions (and corners), never more
    # Each corner ends a vertical edge (a transition in a row, or the box's side), so a mask with few of those
    # needs no count; a thin frame's column has two per row, and few corners.
    if max_vertices is not None and 2 * (transitions + 2 * crop.shape[0]) > TRACED_CORNERS_PER_VERTEX * max_vertices:
        corners = outline_corners(crop)
        if corners > TRACED_CORNERS_PER_VERTEX * max_vertices:
            raise AnswerTooLargeError(
                f"the mask's outline has {corners} corners, too many to trace for an answer of at most {max_vertices}"
                f" vertices (MAX_POLYGON_VERTICES; tracing stops at {TRACED_CORNERS_PER_VERTEX} corners per vertex): "
                "raise it, or answer a brush for such a bristly mask"
            )
    # The box is traced scaled up 2x, with a blank border so that OpenCV never meets the frame's edge.
    scaled = np.zeros((2 * crop.shape[0] + 2, 2 * crop.shape[1] + 2), np.uint8)
    scaled[1:-1, 1:-1] = cv2.resize(crop.view(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    # Straight runs as their two ends: what `outline` keeps of them anyway, at a cost by corners, not length.
    contours, hierarchy = cv2.findContours(scaled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    offset = np.array([box.x0, box.y0], np.int64)
    links = hierarchy[0]

    def outline(index: int) -> np.ndarray:
        # Index k of the bordered scaled-up image is k - 1 unbordered, whose pixel edge is (k - 1 + 1) // 2.
        return _without_redundant_vertices(contours[index].reshape(-1, 2).astype(np.int64) // 2 + offset)

    holes = []  # (area, index of the part's outer contour, outline)
    for index in np.flatnonzero(links[:, 3] != -1):
        hole = outline(index)
        area = abs(signed_area(hole)) if len(hole) >= 3 else 0.0
        if area >= min_area:
            holes.append((area, int(links[index, 3]), hole))
    holes.sort(key=lambda hole: -hole[0])
    cut_into: dict[int, list[np.ndarray]] = {}  # the largest holes, by part; the others stay filled
    for _, part, hole in holes[:MAX_HOLES]:
        cut_into.setdefault(part, []).append(hole)

    parts = []  # (area, outline, holes cut into it)
    for index in np.flatnonzero(links[:, 3] == -1):
        points = outline(index)
        if len(points) < 3:
            continue
        cut = cut_into.get(int(index), [])
        area = abs(signed_area(points)) - sum(abs(signed_area(hole)) for hole in cut)
        if area < min_area or area <= 0:
            continue
        parts.append((area, points.astype(np.float64), [hole.astype(np.float64) for hole in cut]))
    parts.sort(key=lambda part: -part[0])
    parts = parts[:MAX_PARTS]

    def simplified(tolerance: float) -> list[np.ndarray]:
        polygons = []
        for _, points, cut in parts:
            polygon = _simplified(points, tolerance)
            for hole in cut:
                polygon = _with_hole(polygon, _simplified(hole, tolerance))
            polygons.append(polygon)
        return polygons

    polygons = simplified(tolerance)
    answered_tolerance = tolerance
    # Past the box's diagonal every outline is as simple as Douglas-Peucker makes it (or kept exact, where it
    # would collapse): doubling further changes nothing.
    while max_vertices is not None and sum(len(p) for p in polygons) > max_vertices:
        if answered_tolerance > np.hypot(*crop.shape):
            raise AnswerTooLargeError(
                f"the mask's polygons take {sum(len(p) for p in polygons)} vertices even simplified within "
                f"{answered_tolerance:g} px, over the limit of {max_vertices} (MAX_POLYGON_VERTICES)"
            )
        answered_tolerance = max(2.0 * answered_tolerance, 1.0)
        polygons = simplified(answered_tolerance)
    if answered_tolerance != tolerance:
        logger.info(
            "polygons simplified within %g px instead of %g px to fit MAX_POLYGON_VERTICES=%d",
            answered_tolerance, tolerance, max_vertices,
        )
    return polygons


def to_percent(points: np.ndarray, width: int, height: int) -> list[list[float]]:
    """Pixel-edge points -> Label Studio's [[x %, y %], ...] of the original width and height."""
    scale = np.array([100.0 / width, 100.0 / height])
    return (points * scale).tolist()


def box_to_percent(box: Box, width: int, height: int) -> dict:
    """A Box -> Label Studio's rectangle value (x, y, width, height in percent, no rotation)."""
    return {
        "x": 100.0 * box.x0 / width,
        "y": 100.0 * box.y0 / height,
        "width": 100.0 * (box.x1 - box.x0) / width,
        "height": 100.0 * (box.y1 - box.y0) / height,
        "rotation": 0,
    }
