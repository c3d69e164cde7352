"""Bounds on what one request may ask for, checked before any work is done for it."""

from __future__ import annotations

from .errors import RequestError


def check_frame_size(width: int, height: int, max_pixels: int) -> None:
    """The frame a mask is answered in (Label Studio's original_width x original_height) is built and
    RLE-encoded at full size: it is held to the same pixel limit as images, before any mask exists."""
    if width * height > max_pixels:
        raise RequestError(
            f"original_width x original_height = {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (MAX_IMAGE_PIXELS)"
        )
