"""Polygons and boxes from the same clicks: the label config's control decides the answer's format.

Every returned polygon is rasterised back the way a consumer of the exported annotation would (Pillow's
`ImageDraw.polygon` at the original size) and compared with the clicked object; the exact pixel-edge outline is
also read by pixel centres, where it must give the mask back pixel for pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import click_on, decode_region, encode_png, iou, keypoint, make_scene, predict_body
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segnext_backend import polygons as polygons_module
from segnext_backend.polygons import (
    MAX_HOLES,
    MAX_PARTS,
    bounding_box,
    mask_polygons,
    signed_area,
    to_percent,
    without_small_pieces,
)
from segnext_backend.settings import Settings, SettingsError
from tools.scenes import pillow_polygon_mask, pixel_centre_mask


def config(*controls: str, labels=("Thing", "Other")) -> str:
    """A label config with these region controls (tag types) on the image, and the smart keypoints."""
    label_tags = "".join(f'<Label value="{label}"/>' for label in labels)
    tags = "".join(f'<{tag} name="{tag.lower()}" toName="image">{label_tags}</{tag}>' for tag in controls)
    smart = "".join(f'<Label value="{label}" smart="true"/>' for label in labels)
    return (
        f'<View><Image name="image" value="$image"/>{tags}'
        f'<KeyPointLabels name="tag2" toName="image" smart="true">{smart}</KeyPointLabels></View>'
    )


POLYGON_CONFIG = config("PolygonLabels")
RECTANGLE_CONFIG = config("RectangleLabels")


def regions_of(client, path: str, points: list[dict], label_config: str) -> list[dict]:
    body = predict_body(path, points)
    body["label_config"] = label_config
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.json
    (prediction,) = response.json["results"]
    return prediction["result"]


def polygon_mask(regions: list[dict], width: int, height: int) -> np.ndarray:
    for region in regions:
        assert region["type"] == "polygonlabels" and region["from_name"] == "polygonlabels", region
        assert region["value"]["closed"] is True and region["value"]["polygonlabels"] == ["Thing"]
        assert (region["original_width"], region["original_height"]) == (width, height)
        assert all(0.0 <= x <= 100.0 and 0.0 <= y <= 100.0 for x, y in region["value"]["points"])
    return pillow_polygon_mask(regions, width, height)


# -- the geometry ----------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 24), st.integers(1, 24))))
def test_the_exact_outline_holds_exactly_the_masks_pixels(mask):
    """Tolerance 0: read by pixel centres, the polygons are the mask, holes, pinches and islands included, and
    their area is the pixel count (what COCO's area of an exported polygon will say)."""
    polygons = mask_polygons(mask, tolerance=0.0, min_area=0)
    height, width = mask.shape
    np.testing.assert_array_equal(pixel_centre_mask(polygons, width, height), mask)
    assert sum(abs(signed_area(p)) for p in polygons) == mask.sum()
    for polygon in polygons:  # vertices on pixel corners, never on pixel centres
        assert np.array_equal(polygon, np.round(polygon))


def test_separate_parts_give_one_polygon_each_and_specks_are_left_out():
    mask = np.zeros((60, 80), bool)
    mask[5:25, 5:30] = True  # 500 px
    mask[30:50, 40:75] = True  # 700 px
    mask[55:58, 2:6] = True  # 12 px: a speck
    polygons = mask_polygons(mask, tolerance=1.5, min_area=25)
    assert len(polygons) == 2
    assert [abs(signed_area(p)) for p in polygons] == [700.0, 500.0]  # largest first
    assert len(mask_polygons(mask, tolerance=1.5, min_area=0)) == 3
    assert mask_polygons(mask, tolerance=1.5, min_area=701) == []


def test_a_hole_is_cut_in_through_a_slit_and_a_small_one_is_filled():
    yy, xx = np.mgrid[0:200, 0:300]
    radius = np.hypot(xx - 150, yy - 100)
    ring = (radius <= 80) & (radius >= 30)
    (polygon,) = mask_polygons(ring, tolerance=1.5, min_area=25)
    read = pixel_centre_mask([polygon], 300, 200)
    assert iou(read, ring) >= 0.97 and not read[radius < 28].any()
    regions = [{"value": {"points": to_percent(polygon, 300, 200)}}]
    assert iou(pillow_polygon_mask(regions, 300, 200), ring) >= 0.97  # Pillow leaves the hole open too

    pinhole = np.ones((40, 40), bool)
    pinhole[20:23, 20:23] = False  # 9 px
    (filled,) = mask_polygons(pinhole, tolerance=0.0, min_area=25)
    assert pixel_centre_mask([filled], 40, 40).all() and len(filled) == 4


@settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 24), st.integers(1, 24))), st.sampled_from([0, 2, 5, 12]))
def test_speckled_masks_take_the_connected_components_path_to_the_same_answer(mask, min_area):
    """Above FRAGMENTED_TRANSITIONS the small pieces are removed before tracing: the answer must not change."""
    height, width = mask.shape
    direct = pixel_centre_mask(mask_polygons(mask, 0.0, min_area), width, height)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(polygons_module, "FRAGMENTED_TRANSITIONS", -1)
        cleaned = pixel_centre_mask(mask_polygons(mask, 0.0, min_area), width, height)
    np.testing.assert_array_equal(cleaned, direct)
    np.testing.assert_array_equal(without_small_pieces(mask, min_area), direct)


@pytest.mark.parametrize("fragmented", [False, True])
def test_at_most_max_parts_polygons_and_max_holes_holes_the_largest(fragmented, monkeypatch):
    if fragmented:
        monkeypatch.setattr(polygons_module, "FRAGMENTED_TRANSITIONS", -1)
    squares = np.zeros((20 * 16, 20 * 16), bool)  # 256 squares of 7x7 .. 10x10 pixels
    sizes = {}
    for k in range(256):
        y, x, side = 20 * (k // 16) + 2, 20 * (k % 16) + 2, 7 + k % 4
        squares[y : y + side, x : x + side] = True
        sizes[k] = side * side
    answered = mask_polygons(squares, 0.0, 25)
    assert len(answered) == MAX_PARTS
    assert sorted(abs(signed_area(p)) for p in answered) == sorted(sizes.values())[-MAX_PARTS:]

    sieve = np.ones((20 * 16, 20 * 16), bool)
    sieve[squares] = False  # the same squares as holes in one part
    (part,) = mask_polygons(sieve, 0.0, 25)
    left_open = ~pixel_centre_mask([part], *sieve.shape[::-1])
    assert not (left_open & sieve).any()
    assert left_open.sum() == sum(sorted(sizes.values())[-MAX_HOLES:])  # the largest holes, the rest filled


def test_tolerance_bounds_how_far_the_outline_strays():
    yy, xx = np.mgrid[0:400, 0:500]
    disc = np.hypot(xx - 250, yy - 200) <= 150
    (exact,) = mask_polygons(disc, tolerance=0.0, min_area=0)
    for tolerance in (1.0, 1.5, 3.0):
        (simple,) = mask_polygons(disc, tolerance=tolerance, min_area=0)
        assert len(simple) < len(exact) / 5
        # Every vertex of the exact outline lies within `tolerance` of the simplified polygon's edges.
        a, b = simple, np.roll(simple, -1, axis=0)
        ab = b - a
        t = np.clip(((exact[:, None, :] - a) * ab).sum(2) / (ab**2).sum(1), 0, 1)
        distance = np.linalg.norm(exact[:, None, :] - (a + t[..., None] * ab), axis=2).min(axis=1)
        assert distance.max() <= tolerance + 1e-9


@settings(max_examples=100, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 30), st.integers(1, 30))))
def test_bounding_box_is_the_masks_extent(mask):
    box = bounding_box(mask)
    if not mask.any():
        assert box is None
        return
    rows, columns = np.nonzero(mask)
    assert (box.x0, box.y0, box.x1, box.y1) == (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)


# -- through HTTP, with the test models ---------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(640, 480), (4000, 3000)])
def test_polygons_of_each_scene_object_cover_it(make_client, image_server, width, height):
    client, _ = make_client()
    scene = make_scene(width, height, seed=width + 1)
    path = image_server.add(f"/data/upload/1/poly{width}.png", encode_png(scene.pixels))
    for index in range(3):  # object 2 is a ring: its hole is cut in
        regions = regions_of(client, path, [click_on(scene, index)], POLYGON_CONFIG)
        assert len(regions) == 1, f"object {index}: {len(regions)} polygons"
        score = iou(polygon_mask(regions, width, height), scene.objects[index])
        assert score >= 0.97, f"object {index}: IoU {score:.4f}"


@pytest.mark.parametrize("orientation", [6, 8])
def test_polygons_on_exif_rotated_images_are_in_the_shown_frame(make_client, image_server, orientation):
    client, _ = make_client()
    shown = make_scene(900, 600, seed=orientation)
    stored = np.ascontiguousarray(np.rot90(shown.pixels, 1 if orientation == 6 else -1))
    path = image_server.add(f"/data/upload/1/poly-exif{orientation}.png", encode_png(stored, orientation))
    regions = regions_of(client, path, [click_on(shown, 1)], POLYGON_CONFIG)
    assert iou(polygon_mask(regions, 900, 600), shown.objects[1]) >= 0.97


def test_two_parts_give_two_polygons_and_refinement_moves_them(make_client, image_server):
    client, _ = make_client()
    scene = make_scene(1200, 900, seed=7)
    path = image_server.add("/data/upload/1/refine.png", encode_png(scene.pixels))
    clicks = [click_on(scene, 0), click_on(scene, 1), click_on(scene, 0, positive=False)]
    expected = [[scene.objects[0]], [scene.objects[0], scene.objects[1]], [scene.objects[1]]]
    for k, parts in enumerate(expected, start=1):
        parts = sorted(parts, key=lambda part: -part.sum())  # the polygons come largest first
        regions = regions_of(client, path, clicks[:k], POLYGON_CONFIG)
        assert len(regions) == len(parts), f"after click {k}"
        for region, part in zip(regions, parts):
            assert iou(polygon_mask([region], 1200, 900), part) >= 0.97, f"after click {k}"
        # The brush answer to the same clicks is the mask the polygons trace.
        (brush,) = regions_of(client, path, clicks[:k], config("BrushLabels"))
        assert iou(polygon_mask(regions, 1200, 900), decode_region(brush, 1200, 900)) >= 0.97


def test_rectangle_is_the_masks_bounding_box(make_client, image_server):
    client, _ = make_client()
    scene = make_scene(1000, 700, seed=8)
    path = image_server.add("/data/upload/1/box.png", encode_png(scene.pixels))
    for clicks in ([click_on(scene, 2)], [click_on(scene, 0), click_on(scene, 1)]):  # one part, two parts
        (brush,) = regions_of(client, path, clicks, config("BrushLabels"))
        rows, columns = np.nonzero(decode_region(brush, 1000, 700))
        (box,) = regions_of(client, path, clicks, RECTANGLE_CONFIG)
        assert box["type"] == "rectanglelabels" and box["from_name"] == "rectanglelabels"
        value = box["value"]
        assert value["rectanglelabels"] == ["Thing"] and value["rotation"] == 0
        assert value["x"] == pytest.approx(100 * columns.min() / 1000)
        assert value["y"] == pytest.approx(100 * rows.min() / 700)
        assert value["width"] == pytest.approx(100 * (columns.max() + 1 - columns.min()) / 1000)
        assert value["height"] == pytest.approx(100 * (rows.max() + 1 - rows.min()) / 700)
        assert box["score"] == brush["score"]


def test_when_several_controls_carry_the_label_the_order_setting_picks(make_client, image_server):
    scene = make_scene(640, 480, seed=9)
    path = image_server.add("/data/upload/1/order.png", encode_png(scene.pixels))
    every_kind = config("RectangleLabels", "PolygonLabels", "BrushLabels")
    client, _ = make_client()
    (region,) = regions_of(client, path, [click_on(scene, 1)], every_kind)
    assert region["type"] == "brushlabels"  # the default order: brush, polygon, rectangle
    (region,) = regions_of(client, path, [click_on(scene, 1)], config("RectangleLabels", "PolygonLabels"))
    assert region["type"] == "polygonlabels"
    client, _ = make_client(region_control_order=("rectangle", "polygon"))
    (region,) = regions_of(client, path, [click_on(scene, 1)], every_kind)
    assert region["type"] == "rectanglelabels"
    # A label that only one control carries goes to that control, whatever the order.
    only_polygon = config("RectangleLabels", labels=("Other",)).replace(
        "</View>", '<PolygonLabels name="poly" toName="image"><Label value="Thing"/></PolygonLabels></View>'
    )
    only_polygon = only_polygon.replace('<Label value="Other" smart="true"/>', '<Label value="Thing" smart="true"/>')
    (region,) = regions_of(client, path, [click_on(scene, 1)], only_polygon)
    assert region["type"] == "polygonlabels" and region["from_name"] == "poly"


def test_settings_read_the_order_and_the_polygon_limits():
    read = Settings.from_env(
        {"REGION_CONTROL_ORDER": " Polygon, brush ", "POLYGON_TOLERANCE": "0", "POLYGON_MIN_AREA": "100"}
    )
    assert read.region_control_order == ("polygon", "brush")
    assert (read.polygon_tolerance, read.polygon_min_area) == (0.0, 100.0)
    assert Settings.from_env({"REGION_CONTROL_ORDER": " "}).region_control_order == ("brush", "polygon", "rectangle")
    for bad in ({"REGION_CONTROL_ORDER": "polygon,mask"}, {"REGION_CONTROL_ORDER": "brush,brush"},
                {"POLYGON_TOLERANCE": "-1"}, {"POLYGON_TOLERANCE": "nan"}, {"POLYGON_MIN_AREA": "lots"}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            Settings.from_env(bad)


def test_a_label_or_config_the_backend_cannot_answer_is_a_400_naming_them(make_client, image_server):
    client, spy = make_client(region_control_order=("polygon", "rectangle"))
    scene = make_scene(400, 300)
    path = image_server.add("/data/upload/1/bad-control.png", encode_png(scene.pixels))

    def error(points, label_config) -> str:
        body = predict_body(path, points)
        body["label_config"] = label_config
        response = client.post("/predict", json=body)
        assert response.status_code == 400, response.json
        return response.json["error"]

    message = error([keypoint(30, 30, 400, 300, label="Nope")], POLYGON_CONFIG)
    assert "'Nope'" in message and "polygonlabels (PolygonLabels: Thing, Other)" in message
    # Only a brush control, and brushes are not in REGION_CONTROL_ORDER here.
    message = error([click_on(scene, 0)], config("BrushLabels"))
    assert "PolygonLabels" in message and "brushlabels (BrushLabels" in message and "REGION_CONTROL_ORDER" in message
    # The polygon control is on another image than the one clicked.
    elsewhere = POLYGON_CONFIG.replace('toName="image">', 'toName="other">', 1).replace(
        "</View>", '<Image name="other" value="$other"/></View>'
    )
    message = error([click_on(scene, 0)], elsewhere)
    assert "'Thing'" in message and "'image'" in message and "polygonlabels" in message
    assert spy.encodes == 0 and spy.decodes == []
    assert len(regions_of(client, path, [click_on(scene, 0)], POLYGON_CONFIG)) == 1  # the next one is served


# -- bounded answers --------------------------------------------------------------------------------------------


def comb(teeth: int, length: int = 60) -> np.ndarray:
    """A spine with `teeth` bristles one pixel wide, one pixel apart, of varying lengths: a bristly mask."""
    mask = np.zeros((length + 10, 2 * teeth + 4), bool)
    mask[:6, 2 : 2 * teeth + 2] = True
    for k in range(teeth):
        mask[6 : 6 + length - (k * 7) % 23, 2 + 2 * k] = True
    return mask


@settings(max_examples=100, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 30), st.integers(1, 30))), st.integers(1, 40))
def test_outline_corners_are_the_grid_points_where_the_outline_turns(mask, scan_pixels):
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
    padded[1:-1, 1:-1] = mask
    around = padded[:-1, :-1] + padded[:-1, 1:] + padded[1:, :-1] + padded[1:, 1:]
    pinch = (around == 2) & (padded[:-1, :-1] == padded[1:, 1:])
    expected = np.count_nonzero((around == 1) | (around == 3)) + 2 * np.count_nonzero(pinch)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(polygons_module, "_SCAN_PIXELS", scan_pixels)
        assert polygons_module.outline_corners(mask) == expected


def test_a_bristly_answer_is_simplified_until_it_fits_max_vertices(caplog):
    mask = comb(200)
    unbounded = mask_polygons(mask, 1.5, 25)
    vertices = sum(len(p) for p in unbounded)
    assert vertices > 300
    assert [p.tolist() for p in mask_polygons(mask, 1.5, 25, max_vertices=vertices)] == [p.tolist() for p in unbounded]
    with caplog.at_level("INFO", logger="segnext_backend.polygons"):
        bounded = mask_polygons(mask, 1.5, 25, max_vertices=vertices // 10)
    assert 0 < sum(len(p) for p in bounded) <= vertices // 10
    inside = pixel_centre_mask(bounded, *mask.shape[::-1])
    assert (inside & mask).sum() > 0.6 * mask.sum()  # coarser (the gaps between bristles filled), still the object
    assert "MAX_POLYGON_VERTICES" in caplog.text


def test_a_mask_with_too_many_corners_is_refused_before_it_is_traced(monkeypatch):
    from segnext_backend.errors import AnswerTooLargeError

    mask = comb(200)
    corners = polygons_module.outline_corners(mask)
    limit = corners // polygons_module.TRACED_CORNERS_PER_VERTEX - 1
    traced = []
    monkeypatch.setattr(polygons_module.cv2, "findContours", lambda *args: traced.append(1))
    with pytest.raises(AnswerTooLargeError, match=f"{corners} corners.*MAX_POLYGON_VERTICES"):
        mask_polygons(mask, 1.5, 25, max_vertices=limit)
    assert traced == []


def test_a_thin_frame_is_traced_at_a_cost_by_corners_not_by_length(monkeypatch):
    """A 1 x 2,000,000 mask: each straight side is traced as its two ends (point by point, it was millions of
    points, ~100 bytes each, for a 4-vertex polygon)."""
    mask = np.zeros((2_000_000, 1), bool)
    mask[100:1_900_000] = True
    traced_points = []
    find_contours = polygons_module.cv2.findContours

    def counting(*args):
        contours, hierarchy = find_contours(*args)
        traced_points.append(sum(len(c) for c in contours))
        return contours, hierarchy

    monkeypatch.setattr(polygons_module.cv2, "findContours", counting)
    (polygon,) = mask_polygons(mask, 0.0, 25, max_vertices=100)
    assert sorted(map(tuple, polygon.tolist())) == [(0, 100), (0, 1_900_000), (1, 100), (1, 1_900_000)]
    assert traced_points[0] <= 16
