"""The field's clicking robot and its metrics (NoC, NoF, k-mIoU), as RITM, SimpleClick and SegNext evaluate.

The robot plays an annotator who always clicks in the middle of the largest error:
- the false-negative region (object pixels the prediction misses) and the false-positive region (background
  pixels it covers), both without the ignore pixels, each get a Euclidean distance transform, computed with
  one zero pixel of padding on every side so that the image border counts as a boundary;
- pixels already clicked get distance zero (they stay part of their region: only their own value is zeroed);
- if the largest false-negative distance is greater than the largest false-positive distance, the next click
  is positive at that pixel, otherwise negative at the largest false-positive distance (so the first click,
  on an empty prediction, is positive); ties go to the first pixel in row-major order.
IoU counts only the pixels not marked ignore. NoC@t is the number of the first click whose IoU reaches t (20
when none does); NoF@t counts the objects that never reach t within 20 clicks; k-mIoU is the mean IoU after k
clicks, with all 20 clicks always run.

Framework-free: numpy and scipy only; the model is a callable from clicks to a boolean mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt

MAX_CLICKS = 20
IOU_THRESHOLDS = (0.85, 0.90, 0.95)


@dataclass(frozen=True)
class RobotClick:
    row: int
    col: int
    positive: bool


def _deepest_pixel(region: np.ndarray, not_clicked: np.ndarray) -> tuple[float, int, int]:
    """(distance, row, col) of the region's pixel farthest from the region's boundary, among the pixels not
    clicked yet; (0.0, 0, 0) when there is none (as the full-image argmax of an all-zero map).

    The transform runs on the region's bounding box plus a one-pixel ring of zeros (the image border's
    padding, or background pixels): every pixel outside the box is outside the region, and for any such
    pixel the ring holds one at most as far away (clamp its coordinates into the box), so the distances are
    those of the full padded image. Row-major order inside the box is row-major order in the image.
    """
    rows = np.flatnonzero(region.any(axis=1))
    if rows.size == 0:
        return 0.0, 0, 0
    cols = np.flatnonzero(region.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.pad(region[top:bottom, left:right], 1)
    distances = distance_transform_edt(box)[1:-1, 1:-1]
    distances[~not_clicked[top:bottom, left:right]] = 0.0
    flat = int(np.argmax(distances))  # the first maximum in row-major order
    row, col = divmod(flat, distances.shape[1])
    deepest = float(distances[row, col])
    if deepest == 0.0:  # every region pixel already clicked: the full map is all zeros
        return 0.0, 0, 0
    return deepest, int(top + row), int(left + col)


class ClickingRobot:
    """Chooses the clicks for one object, one after another, from the prediction each click produced."""

    def __init__(self, object_mask: np.ndarray, ignore_mask: np.ndarray | None = None):
        self.object_mask = np.asarray(object_mask, dtype=bool)
        if ignore_mask is None:
            ignore_mask = np.zeros_like(self.object_mask)
        if ignore_mask.shape != self.object_mask.shape:
            raise ValueError(f"ignore mask {ignore_mask.shape} and object mask {self.object_mask.shape} differ in size")
        self.counted = ~np.asarray(ignore_mask, dtype=bool)
        self.not_clicked = np.ones(self.object_mask.shape, dtype=bool)
        self.clicks: list[RobotClick] = []

    def next_click(self, prediction: np.ndarray) -> RobotClick:
        if prediction.shape != self.object_mask.shape:
            raise ValueError(f"prediction {prediction.shape} and object mask {self.object_mask.shape} differ in size")
        false_negative = self.object_mask & ~prediction & self.counted
        false_positive = ~self.object_mask & prediction & self.counted
        fn_distance, fn_row, fn_col = _deepest_pixel(false_negative, self.not_clicked)
        fp_distance, fp_row, fp_col = _deepest_pixel(false_positive, self.not_clicked)
        if fn_distance > fp_distance:
            click = RobotClick(fn_row, fn_col, True)
        else:
            click = RobotClick(fp_row, fp_col, False)
        self.not_clicked[click.row, click.col] = False
        self.clicks.append(click)
        return click


def iou(object_mask: np.ndarray, prediction: np.ndarray, ignore_mask: np.ndarray | None = None) -> float:
    """Intersection over union of the pixels not marked ignore."""
    counted = np.ones(object_mask.shape, dtype=bool) if ignore_mask is None else ~ignore_mask
    union = np.count_nonzero((object_mask | prediction) & counted)
    if union == 0:
        raise ValueError("IoU of an empty object and an empty prediction is undefined")
    return np.count_nonzero(object_mask & prediction & counted) / union


def run_robot(
    predict: Callable[[Sequence[RobotClick]], np.ndarray],
    object_mask: np.ndarray,
    ignore_mask: np.ndarray | None = None,
    max_clicks: int = MAX_CLICKS,
) -> np.ndarray:
    """The IoU after each of `max_clicks` clicks; `predict(clicks)` is the model's mask after those clicks."""
    robot = ClickingRobot(object_mask, ignore_mask)
    if not (robot.object_mask & robot.counted).any():
        raise ValueError("the object has no pixels outside the ignore region")
    prediction = np.zeros(robot.object_mask.shape, dtype=bool)
    ious = np.empty(max_clicks, dtype=np.float64)
    for index in range(max_clicks):
        robot.next_click(prediction)
        prediction = np.asarray(predict(list(robot.clicks)), dtype=bool)
        ious[index] = iou(robot.object_mask, prediction, ~robot.counted)
    return ious


def number_of_clicks(ious: Sequence[float], threshold: float, max_clicks: int = MAX_CLICKS) -> int:
    """NoC@threshold of one object: the number of the first click whose IoU reaches it, max_clicks if none."""
    reached = np.asarray(ious) >= threshold
    return int(np.argmax(reached)) + 1 if reached.any() else max_clicks


def summarize(all_ious: np.ndarray) -> dict:
    """objects x clicks IoUs -> the summary: NoC and NoF at 85/90/95 %, mIoU after each click, object count."""
    all_ious = np.asarray(all_ious, dtype=np.float64)
    if all_ious.ndim != 2 or all_ious.shape[0] == 0:
        raise ValueError(f"need an objects x clicks array with at least one object, got shape {all_ious.shape}")
    summary = {}
    for threshold in IOU_THRESHOLDS:
        percent = round(threshold * 100)
        summary[f"noc{percent}"] = float(np.mean([number_of_clicks(row, threshold, all_ious.shape[1]) for row in all_ious]))
    for threshold in IOU_THRESHOLDS:
        summary[f"nof{round(threshold * 100)}"] = int(np.sum(~(all_ious >= threshold).any(axis=1)))
    summary["miou"] = [float(value) for value in all_ious.mean(axis=0)]
    summary["objects"] = int(all_ious.shape[0])
    return summary
