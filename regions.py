"""A mask as Label Studio regions: one brush region, one polygon per part of the mask, or the mask's box, in
the format of the control that answers the label. Shared by clicks (model.py) and points (preannotation.py)."""

from __future__ import annotations

import uuid

from label_config import ImageTarget
from segnext_backend.masks import ObjectMask, mask_to_rle
from segnext_backend.settings import Settings


def mask_regions(
    settings: Settings,
    target: ImageTarget,
    label: str,
    object_mask: ObjectMask,
    width: int,
    height: int,
    rotation: float,
) -> list[dict]:
    """The regions of `object_mask` (in the width x height frame) for `target`'s control; none for an empty mask
    (an empty region would be an invisible suggestion the annotator cannot act on). Raises AnswerTooLargeError
    for a mask whose answer would exceed MAX_BRUSH_RLE_BYTES or MAX_POLYGON_VERTICES."""
    if object_mask.is_empty:
        return []
    # Imported here: OpenCV starts threads when imported, and a server that imports the model module and then
    # forks its workers (gunicorn --preload) must not have them in the parent.
    from segnext_backend.polygons import bounding_box, box_to_percent, mask_polygons, to_percent

    labels = {target.region_type: [label]}
    if target.region_type == "polygonlabels":
        polygons = mask_polygons(
            object_mask.mask, settings.polygon_tolerance, settings.polygon_min_area, settings.max_polygon_vertices
        )
        values = [{"points": to_percent(p, width, height), "closed": True, **labels} for p in polygons]
    elif target.region_type == "rectanglelabels":
        values = [{**box_to_percent(bounding_box(object_mask.mask), width, height), **labels}]
    else:
        values = [{"format": "rle", "rle": mask_to_rle(object_mask.mask, settings.max_brush_rle_bytes), **labels}]
    return [
        {
            "id": uuid.uuid4().hex[:10],
            "from_name": target.from_name,
            "to_name": target.to_name,
            "type": target.region_type,
            "original_width": width,
            "original_height": height,
            "image_rotation": rotation,
            "value": value,
            "score": object_mask.score,
            "readonly": False,
        }
        for value in values
    ]
