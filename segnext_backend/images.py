"""Task images: where to fetch them, how to fetch them safely, and how to turn them into RGB pixels.

- Relative paths (`/data/upload/1/x.png`, `/data/local-files/?d=...`) are served by Label Studio: they are
  fetched from `LABEL_STUDIO_URL` with the API key. Absolute http(s) URLs are fetched as they are, and the
  Label Studio key is sent only when the URL is on the Label Studio host itself.
- Downloads stop at a byte limit; images over a pixel limit are refused from their header, before decoding.
- The EXIF orientation is applied, because the browser shows the image rotated and the clicks are in that
  frame; every mode (L, LA, P, RGBA, I;16, CMYK, ...) becomes 8-bit RGB.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageTooLargeError, ImageUnavailableError, RequestError

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ImageFetchConfig:
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    max_bytes: int = 100 * 1024 * 1024
    max_pixels: int = 100_000_000
    connect_timeout: float = 5.0
    read_timeout: float = 30.0


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port


class ImageSource:
    """Fetches and decodes task images. Thread-safe: one `requests.Session` per call."""

    def __init__(self, config: ImageFetchConfig):
        self.config = config

    def resolve(self, image_ref: str) -> str:
        """The absolute URL of a task's image field; this is also the image's identity in the caches."""
        if not isinstance(image_ref, str) or not image_ref.strip():
            raise RequestError("the task's image field is empty or not a string")
        image_ref = image_ref.strip()
        scheme = urlsplit(image_ref).scheme.lower()
        if scheme in ("http", "https"):
            return image_ref
        if scheme:
            raise RequestError(f"image URL scheme {scheme!r} is not supported (use http, https or a Label Studio path)")
        if not image_ref.startswith("/"):
            raise RequestError(f"image reference {image_ref!r} is neither a URL nor a Label Studio path")
        if not self.config.label_studio_url:
            raise RequestError(
                f"the image {image_ref!r} is a Label Studio path: set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) "
                "so that the backend can fetch it"
            )
        return urljoin(self.config.label_studio_url + "/", image_ref.lstrip("/"))

    def _is_label_studio(self, url: str) -> bool:
        return bool(self.config.label_studio_url) and _origin(url) == _origin(self.config.label_studio_url)

    def fetch(self, url: str) -> bytes:
        """The image's bytes, or an ImageUnavailableError that names the host and what went wrong."""
        headers = {}
        to_label_studio = self._is_label_studio(url)
        if to_label_studio and self.config.label_studio_api_key:
            headers["Authorization"] = f"Token {self.config.label_studio_api_key}"
        host = urlsplit(url).netloc
        timeout = (self.config.connect_timeout, self.config.read_timeout)
        try:
            with requests.Session() as session:
                # Redirects are not followed: one could lead the Label Studio key to another host.
                with session.get(url, headers=headers, timeout=timeout, stream=True, allow_redirects=False) as response:
                    if response.status_code != 200:
                        hint = ""
                        if response.status_code in (401, 403) and to_label_studio:
                            hint = " (check LABEL_STUDIO_API_KEY)"
                        elif 300 <= response.status_code < 400:
                            hint = " (redirects are not followed)"
                        raise ImageUnavailableError(
                            f"fetching the image from {host} failed: HTTP {response.status_code}{hint}"
                        )
                    declared = response.headers.get("Content-Length")
                    if declared and declared.isdigit() and int(declared) > self.config.max_bytes:
                        raise ImageTooLargeError(
                            f"the image at {host} is {int(declared)} bytes, over the limit of {self.config.max_bytes} "
                            "(MAX_IMAGE_BYTES)"
                        )
                    body = bytearray()
                    for chunk in response.iter_content(_CHUNK):
                        body += chunk
                        if len(body) > self.config.max_bytes:
                            raise ImageTooLargeError(
                                f"the image at {host} is over the limit of {self.config.max_bytes} bytes (MAX_IMAGE_BYTES)"
                            )
                    return bytes(body)
        except requests.Timeout:
            raise ImageUnavailableError(f"fetching the image from {host} timed out") from None
        except requests.RequestException as error:
            raise ImageUnavailableError(f"fetching the image from {host} failed: {type(error).__name__}") from None

    def decode(self, data: bytes) -> np.ndarray:
        """Image bytes -> HxWx3 uint8 RGB, EXIF orientation applied."""
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise ImageTooLargeError(
                f"the image has too many pixels (the limit is {self.config.max_pixels}, MAX_IMAGE_PIXELS)"
            ) from None
        except (UnidentifiedImageError, OSError, ValueError):
            raise ImageUnavailableError("the image could not be decoded: not a supported image format") from None
        width, height = image.size
        if width * height > self.config.max_pixels:
            raise ImageTooLargeError(
                f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                f"{self.config.max_pixels} (MAX_IMAGE_PIXELS)"
            )
        try:
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
        except (OSError, ValueError, SyntaxError) as error:
            raise ImageUnavailableError(f"the image could not be decoded: {error}") from None

    def load(self, image_ref: str) -> np.ndarray:
        return self.decode(self.fetch(self.resolve(image_ref)))


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> HxWx3 uint8 RGB.

    16- and 32-bit greyscale is scaled to 8 bits rather than clipped (Pillow's own conversion clips, which
    turns most 16-bit images white). Transparent pixels are shown over white, as a browser shows them on
    Label Studio's page.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)
