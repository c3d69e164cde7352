"""Fetching and decoding task images: modes, limits, errors, and where the Label Studio key goes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from segnext_backend.errors import ImageTooLargeError, ImageUnavailableError, RequestError
from segnext_backend.images import ImageFetchConfig, ImageRef, ImageSource, to_rgb


def source(**overrides) -> ImageSource:
    overrides.setdefault("allow_private_hosts", True)  # the test servers are on 127.0.0.1
    return ImageSource(ImageFetchConfig(**overrides))


def url_ref(url: str) -> ImageRef:
    return ImageRef("url", url)


def encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds almost nothing: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("L", 100, (100, 100, 100)),
        ("RGB", (10, 20, 30), (10, 20, 30)),
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # fully transparent shows the page's white
        ("LA", (50, 255), (50, 50, 50)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 32896, (128, 128, 128)),  # scaled, not clipped to white
        ("I", 1000, (4, 4, 4)),  # 32-bit with values above 255: read as 16-bit
        ("1", 1, (255, 255, 255)),
    ],
)
def test_every_mode_becomes_8_bit_rgb(mode, value, expected):
    rgb = to_rgb(Image.new(mode, (3, 2), value))
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert tuple(rgb[1, 2]) == expected


def test_palette_with_transparency():
    image = Image.new("P", (2, 2), 0)
    image.putpalette([200, 10, 10] + [0, 0, 0] * 255)
    image.info["transparency"] = 1
    image.putpixel((1, 1), 1)
    rgb = to_rgb(image)
    assert tuple(rgb[0, 0]) == (200, 10, 10) and tuple(rgb[1, 1]) == (255, 255, 255)


def test_sixteen_bit_png_file_is_scaled():
    values = np.array([[0, 65535], [257 * 100, 257 * 200]], dtype=np.uint16)
    data = encoded(Image.fromarray(values))
    rgb = source().decode(data)
    np.testing.assert_array_equal(rgb[:, :, 0], [[0, 255], [100, 200]])


def test_exif_orientation_is_applied():
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:4, :4] = (255, 0, 0)  # top-left corner of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    rgb = source().decode(encoded(Image.fromarray(stored), "JPEG", exif=exif, quality=95))
    assert rgb.shape == (40, 20, 3)
    assert rgb[0, -1, 0] > 200 and rgb[0, 0, 0] < 50  # top-left went to top-right


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    small = encoded(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS"):
        source(max_pixels=9999).decode(small)
    assert source(max_pixels=10000).decode(small).shape == (100, 100, 3)


def test_decompression_bomb_is_refused_without_decoding_it():
    bomb = png_header_only(50_000, 50_000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError):
        source().decode(bomb)
    with pytest.raises(ImageTooLargeError):
        source(max_pixels=10**10).decode(bomb)  # past our limit Pillow's own bomb guard still holds


@pytest.mark.parametrize("data", [b"", b"not an image", encoded(Image.new("RGB", (64, 64)), "JPEG")[:200]])
def test_undecodable_bytes_are_an_image_error(data):
    with pytest.raises(ImageUnavailableError):
        source().decode(data)


def test_locate_relative_paths_against_label_studio():
    ls = source(label_studio_url="http://ls.example:8080")
    assert ls.locate("/data/upload/1/a.png") == url_ref("http://ls.example:8080/data/upload/1/a.png")
    assert ls.locate("/data/local-files/?d=a/b.png") == url_ref("http://ls.example:8080/data/local-files/?d=a/b.png")
    assert ls.locate("https://cdn.example/x.jpg") == url_ref("https://cdn.example/x.jpg")
    assert ls.locate("s3://bucket/a.png", task_id=7) == ImageRef("cloud", "s3://bucket/a.png", 7)
    with pytest.raises(RequestError, match="LABEL_STUDIO_URL"):
        source().locate("/data/upload/1/a.png")
    for bad in ("file:///etc/passwd", "ftp://x/y.png", "gopher://x", "", "relative/path.png", 42, "s3://b/no-task.png"):
        with pytest.raises(RequestError):
            ls.locate(bad)


def test_fetch_errors_name_the_host_and_status(image_server):
    ls = source(label_studio_url=image_server.url, label_studio_api_key="k")
    image_server.add("/gone.png", 404)
    image_server.add("/denied.png", 401)
    host = image_server.url.split("//")[1]
    with pytest.raises(ImageUnavailableError, match=f"{host}.*HTTP 404"):
        ls.fetch(url_ref(image_server.url + "/gone.png"))
    with pytest.raises(ImageUnavailableError, match="HTTP 401.*LABEL_STUDIO_API_KEY"):
        ls.fetch(url_ref(image_server.url + "/denied.png"))


def test_fetch_times_out(image_server):
    image_server.add("/slow.png", b"x")
    image_server.delay_seconds = 1.0
    with pytest.raises(ImageUnavailableError, match="timed out"):
        source(read_timeout=0.2).fetch(url_ref(image_server.url + "/slow.png"))


def test_fetch_stops_at_the_byte_limit(image_server):
    image_server.add("/huge.png", b"x" * 5000)
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_BYTES"):
        source(max_bytes=4999).fetch(url_ref(image_server.url + "/huge.png"))
    assert len(source(max_bytes=5000).fetch(url_ref(image_server.url + "/huge.png"))) == 5000


def test_unreachable_host_is_an_image_error():
    from tools.file_server import free_port

    port = free_port()  # nothing listens there
    with pytest.raises(ImageUnavailableError, match=f"127.0.0.1:{port}"):
        source(connect_timeout=0.5).fetch(url_ref(f"http://127.0.0.1:{port}/x.png"))


def test_a_5xx_or_refused_connection_is_retried_once_and_a_4xx_is_not(image_server):
    flaky = {"count": 0}
    original = image_server.files

    class FlakyFiles(dict):
        def get(self, path, default=None):
            if path == "/flaky.png":
                flaky["count"] += 1
                return 503 if flaky["count"] == 1 else b"second time lucky"
            return original.get(path, default)

    image_server.files = FlakyFiles()
    assert source().fetch(url_ref(image_server.url + "/flaky.png")) == b"second time lucky"
    assert flaky["count"] == 2

    original["/broken.png"] = 500
    original["/gone.png"] = 404
    with pytest.raises(ImageUnavailableError, match="HTTP 500"):
        source().fetch(url_ref(image_server.url + "/broken.png"))
    with pytest.raises(ImageUnavailableError, match="HTTP 404"):
        source().fetch(url_ref(image_server.url + "/gone.png"))
    assert len(image_server.requests_for("/broken.png")) == 2 and len(image_server.requests_for("/gone.png")) == 1


def test_fast_jpeg_decode_shrinks_large_jpegs_but_never_below_the_model_frame():
    rng = np.random.default_rng(5)
    photo = encoded(Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)), "JPEG", quality=90)
    assert source().decode(photo).shape == (3000, 4000, 3)  # off by default: upstream's exact input
    fast = source(fast_jpeg_decode=True).decode(photo)
    assert fast.shape == (1500, 2000, 3)
    small = encoded(Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8)), "JPEG", quality=90)
    assert source(fast_jpeg_decode=True).decode(small).shape == (1200, 1600, 3)
    png = encoded(Image.new("RGB", (4000, 3000)))
    assert source(fast_jpeg_decode=True).decode(png).shape == (3000, 4000, 3)
