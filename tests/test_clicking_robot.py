"""The clicking robot and its metrics (tools/clicking_robot.py) against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.ndimage import distance_transform_edt

from tools.clicking_robot import (
    ClickingRobot,
    RobotClick,
    _deepest_pixel,
    iou,
    number_of_clicks,
    run_robot,
    summarize,
)


def block(shape, rows, cols) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


EMPTY = np.zeros((7, 9), dtype=bool)


def test_the_first_click_is_positive_at_the_deepest_pixel_and_ties_go_to_the_first_in_row_major_order():
    # A 3x5 block (rows 2-4, columns 2-6): the middle row's three inner pixels (3,3), (3,4), (3,5) are all
    # 2 from the nearest background pixel; the first of them in row-major order wins.
    robot = ClickingRobot(block((7, 9), (2, 5), (2, 7)))
    assert robot.next_click(EMPTY) == RobotClick(3, 3, True)


def test_the_deepest_pixel_of_an_irregular_region():
    # An L in an 11x11 image: a bar (rows 1-3, columns 1-3) on a foot (rows 4-8, columns 1-7). On row 6,
    # (6,3), (6,4) and (6,5) are 3 from the nearest background pixel (row 9; (3,4) above; column 0 or 8);
    # (6,2) and (6,6) are 2 from a side, (5,3) is sqrt(5) from (3,4), row 7 is 2 from row 9.
    mask = block((11, 11), (1, 4), (1, 4)) | block((11, 11), (4, 9), (1, 8))
    assert ClickingRobot(mask).next_click(np.zeros_like(mask)) == RobotClick(6, 3, True)


def test_the_image_border_counts_as_a_boundary():
    # Object: the top three rows of a 6x10 image. With one zero pixel of padding, the middle row is 2 from
    # the padding above and from row 3 below, and 2 from the padding on the left first at column 1: (1, 1).
    # Without the padding the top row would be 3 from row 3 and no boundary above: (0, 0).
    robot = ClickingRobot(block((6, 10), (0, 3), (0, 10)))
    assert robot.next_click(np.zeros((6, 10), dtype=bool)) == RobotClick(1, 1, True)


def test_ignore_pixels_are_neither_error_nor_counted():
    # A 9x9 object (rows 1-9, columns 1-9 of 11x11), deepest at (5,5). Its top four rows are marked ignore:
    # what is left is 5x9 (rows 5-9), whose deepest pixels are on row 7, 3 from rows 4 and 10; columns 3-7
    # are 3 from the sides too, and the first is (7, 3).
    mask = block((11, 11), (1, 10), (1, 10))
    ignore = block((11, 11), (1, 5), (0, 11))
    assert ClickingRobot(mask).next_click(np.zeros_like(mask)) == RobotClick(5, 5, True)
    assert ClickingRobot(mask, ignore).next_click(np.zeros_like(mask)) == RobotClick(7, 3, True)
    # A prediction that covers ignored background is not a false positive either.
    prediction = mask.copy()
    prediction[1:5, 0] = True  # background, ignored
    assert iou(mask, prediction, ignore) == 1.0
    assert iou(mask, prediction) == pytest.approx(81 / 85)


def test_a_clicked_pixel_is_not_clicked_again_and_does_not_become_a_boundary():
    robot = ClickingRobot(block((7, 9), (2, 5), (2, 7)))
    assert robot.next_click(EMPTY) == RobotClick(3, 3, True)
    # The model found nothing: the same region again. (3,3) is out; (3,4) keeps its distance 2 (had the
    # clicked pixel been made background before the transform, (3,4) would be 1 and (2,2) would come first).
    assert robot.next_click(EMPTY) == RobotClick(3, 4, True)
    assert robot.next_click(EMPTY) == RobotClick(3, 5, True)
    assert robot.next_click(EMPTY) == RobotClick(2, 2, True)  # then the distance-1 pixels, in row-major order
    assert len(robot.clicks) == 4


def test_the_larger_error_wins_and_a_tie_is_a_negative_click():
    truth = block((9, 20), (1, 8), (1, 8))  # 7x7 object, depth 4 at (4,4)
    # Predicted: nothing of the object; a 7x7 false positive on the right (depth 4 at (4,13)): a tie.
    false_positive = block((9, 20), (1, 8), (10, 17))
    assert ClickingRobot(truth).next_click(false_positive) == RobotClick(4, 13, False)
    # A thinner false positive (5 wide, depth 3): the false negative is larger.
    thinner = block((9, 20), (2, 7), (10, 15))
    assert ClickingRobot(truth).next_click(thinner) == RobotClick(4, 4, True)
    # The object found, plus the false positive: a negative click in it.
    assert ClickingRobot(truth).next_click(truth | thinner) == RobotClick(4, 12, False)


def test_a_perfect_prediction_gives_a_negative_click_on_the_first_pixel():
    truth = block((5, 5), (1, 4), (1, 4))
    assert ClickingRobot(truth).next_click(truth) == RobotClick(0, 0, False)


def reference_deepest(region: np.ndarray, not_clicked: np.ndarray) -> tuple[float, int, int]:
    """The protocol as written: the whole image padded, transformed, clicked pixels zeroed, first maximum."""
    distances = distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    distances[~not_clicked] = 0.0
    row, col = np.unravel_index(np.argmax(distances), distances.shape)
    return float(distances[row, col]), int(row), int(col)


@settings(max_examples=300, deadline=None)
@given(
    region=arrays(bool, st.tuples(st.integers(1, 24), st.integers(1, 24))),
    clicked_seed=st.integers(0, 2**32 - 1),
)
def test_the_bounding_box_transform_is_the_full_image_transform(region, clicked_seed):
    not_clicked = np.random.default_rng(clicked_seed).random(region.shape) > 0.1
    assert _deepest_pixel(region, not_clicked) == reference_deepest(region, not_clicked)


def test_run_robot_feeds_back_every_click_and_records_each_iou():
    truth = block((8, 8), (2, 6), (2, 6))
    half = block((8, 8), (2, 6), (2, 4))
    seen = []

    def predict(clicks):
        seen.append(list(clicks))
        return half if len(clicks) == 1 else truth

    ious = run_robot(predict, truth, max_clicks=3)
    assert [len(clicks) for clicks in seen] == [1, 2, 3]
    assert seen[1][0] == seen[2][0] and seen[1][1] == seen[2][1]  # the same clicks, one more each time
    assert seen[1][1].positive and seen[1][1].col >= 4  # the second click in the missed right half
    np.testing.assert_allclose(ious, [0.5, 1.0, 1.0])


def test_an_object_without_counted_pixels_is_refused():
    truth = block((4, 4), (1, 3), (1, 3))
    with pytest.raises(ValueError, match="no pixels"):
        run_robot(lambda clicks: truth, truth, ignore_mask=truth)


def test_number_of_clicks_and_the_summary():
    ious = np.array(
        [
            [0.5, 0.86, 0.91, 0.96] + [0.96] * 16,  # NoC 2 / 3 / 4
            [0.95] + [0.95] * 19,  # NoC 1 / 1 / 1
            [0.1] * 19 + [0.9],  # reaches 85 % and 90 % at click 20: NoC 20, but not a failure; never 95 %
        ]
    )
    assert number_of_clicks(ious[0], 0.85) == 2
    assert number_of_clicks(ious[2], 0.95) == 20
    summary = summarize(ious)
    assert list(summary) == ["noc85", "noc90", "noc95", "nof85", "nof90", "nof95", "miou", "objects"]
    assert summary["noc85"] == pytest.approx((2 + 1 + 20) / 3)
    assert summary["noc90"] == pytest.approx((3 + 1 + 20) / 3)
    assert summary["noc95"] == pytest.approx((4 + 1 + 20) / 3)
    assert (summary["nof85"], summary["nof90"], summary["nof95"]) == (0, 0, 1)
    assert len(summary["miou"]) == 20
    assert summary["miou"][0] == pytest.approx((0.5 + 0.95 + 0.1) / 3)
    assert summary["miou"][19] == pytest.approx((0.96 + 0.95 + 0.9) / 3)
    assert summary["objects"] == 3
