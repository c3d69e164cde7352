"""Ground truth for tools.evaluate, read from a team's own labels in one of three formats.

- A folder of images and a folder of masks: `images/NAME.ext`, and `masks/NAME_K.png` for each object K of
  that image (0 background, 255 object, 128 ignore; single channel).
- A Label Studio JSON export (a list of tasks): each brush region (its RLE) and each polygon region of a
  task's annotation is one object, in the region's `original_width` x `original_height` frame. The task's
  image is found in a folder by its file name, or fetched from Label Studio as the backend fetches it.
- A COCO annotation file: each annotation (polygons, RLE or compressed RLE; crowd annotations left out) is
  one object, its image `file_name` under the images folder.

Everything that can be checked without decoding the masks (files present, sizes, RLE lengths) is checked
when the dataset is read, so that bad input fails before any model runs. Masks are decoded when their object
is evaluated, so a large dataset never sits in memory at once.

A dataset may come from anyone, so what it claims is bounded before anything is built from it: every frame
(an image, a mask, a region's original_width x original_height) is held to the backend's MAX_IMAGE_PIXELS; a
polygon's outline to `MAX_OUTLINE_PER_SIDE` times its frame's width + height (pycocotools allocates per
outline pixel, and crashes on coordinates far outside the frame); a COCO `file_name` must name a file under
the images folder (no absolute path, no `..`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from segnext_backend.settings import Settings

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MASK_NAME = re.compile(r"^(?P<image>.+)_(?P<object>\d+)\.png$", re.IGNORECASE)
OBJECT_VALUE, IGNORE_VALUE, BACKGROUND_VALUE = 255, 128, 0
# Label Studio stores an upload as `<8 hex digits>-<original file name>`.
UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-(?P<name>.+)$")
BRUSH_TYPES = ("brushlabels", "brush")
POLYGON_TYPES = ("polygonlabels", "polygon")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # the EXIF orientations that swap width and height
DEFAULT_MAX_PIXELS = Settings.max_image_pixels  # MAX_IMAGE_PIXELS's default
# A polygon's outline (the sum of its edges' lengths, in pixels) may be this many times its frame's width +
# height: far more than any object's outline, and far less than what exhausts pycocotools.
MAX_OUTLINE_PER_SIDE = 100


class DatasetError(Exception):
    """The dataset cannot be evaluated; the message names the file (and the task or object) at fault."""


@dataclass(frozen=True)
class GroundTruth:
    object_mask: np.ndarray  # height x width bool
    ignore_mask: np.ndarray | None  # height x width bool, or None when nothing is ignored


@dataclass(frozen=True)
class ImageLocation:
    """Where an object's image is: a file on disk, or a Label Studio task's image reference to fetch."""

    path: Path | None = None
    reference: str = ""  # the task's image field, for ImageSource.locate
    task_id: int | None = None

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else self.reference


@dataclass(frozen=True)
class DatasetObject:
    image: str  # the image's name in the outputs
    name: str  # the object's name within its image
    location: ImageLocation
    width: int  # the frame of the mask and of the clicks
    height: int
    source: str  # where the object was read from, for messages
    load: Callable[[], GroundTruth]


# -- limits -----------------------------------------------------------------------------------------------


def check_frame(width: int, height: int, max_pixels: int, where) -> None:
    if width * height > max_pixels:
        raise DatasetError(
            f"{where} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (MAX_IMAGE_PIXELS)"
        )


def check_outline(flat: Sequence[float], width: int, height: int, where: str) -> None:
    """A polygon [x0, y0, x1, y1, ...] in pixels whose outline its frame can hold (see the module docstring)."""
    try:
        points = np.asarray(flat, dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError, OverflowError) as error:  # not numbers, an odd count, beyond a float
        raise DatasetError(f"{where}: a polygon is not a list of x, y pixel coordinates ({error})") from None
    if not np.isfinite(points).all():
        raise DatasetError(f"{where}: a polygon has a coordinate that is not a finite number")
    outline = float(np.abs(np.diff(points, axis=0, append=points[:1])).max(axis=1).sum())
    limit = MAX_OUTLINE_PER_SIDE * (width + height)
    if outline > limit:
        raise DatasetError(
            f"{where}: a polygon's outline is {outline:.6g} pixels long, over the limit of {limit} "
            f"({MAX_OUTLINE_PER_SIDE} x (width + height) of its {width}x{height} frame): "
            "its points lie far outside the frame"
        )


def _is_inside_folder(file_name: str) -> bool:
    """A relative path without '..': joined to a folder, it names something under it."""
    posix = PurePosixPath(file_name.replace("\\", "/"))
    drive = PureWindowsPath(file_name).drive
    return bool(file_name) and not posix.is_absolute() and ".." not in posix.parts and not drive


# -- images on disk ---------------------------------------------------------------------------------------


def displayed_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file as shown, after its EXIF orientation, read from its header; at most
    `max_pixels`."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            check_frame(width, height, max_pixels, path)  # before the EXIF, which may read further
            orientation = image.getexif().get(_EXIF_ORIENTATION)
    except Image.DecompressionBombError as error:
        raise DatasetError(
            f"{path} has more pixels than the limit of {max_pixels} (MAX_IMAGE_PIXELS): {error}"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DatasetError(f"{path} cannot be read as an image: {error}") from None
    return (height, width) if orientation in _TRANSPOSED_ORIENTATIONS else (width, height)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} {path} is not a folder")


def _images_by_stem(images_dir: Path) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
            continue
        if path.stem in by_stem:
            raise DatasetError(f"{by_stem[path.stem]} and {path} have the same name: which one do the masks belong to?")
        by_stem[path.stem] = path
    return by_stem


# -- a folder of masks ------------------------------------------------------------------------------------


def _read_mask_png(path: Path) -> GroundTruth:
    try:
        with Image.open(path) as image:
            mode = image.mode
            values = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path} cannot be read as a PNG mask: {error}") from None
    if mode == "1":
        values = values.astype(np.uint8) * OBJECT_VALUE
    elif mode not in ("L", "P"):
        raise DatasetError(f"{path} is a {mode} image: a mask must have a single channel (0 background, 255 object, 128 ignore)")
    unexpected = np.setdiff1d(np.unique(values), [BACKGROUND_VALUE, IGNORE_VALUE, OBJECT_VALUE])
    if unexpected.size:
        shown = ", ".join(str(v) for v in unexpected[:5])
        raise DatasetError(f"{path} has pixel values other than 0, 128 and 255 ({shown}): 0 is background, 255 object, 128 ignore")
    ignore = values == IGNORE_VALUE
    return GroundTruth(object_mask=values == OBJECT_VALUE, ignore_mask=ignore if ignore.any() else None)


def read_mask_folder(images_dir: Path, masks_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[DatasetObject]:
    _require_dir(images_dir, "--images")
    _require_dir(masks_dir, "--masks")
    images = _images_by_stem(images_dir)
    found = []
    for mask_path in sorted(masks_dir.iterdir()):
        if mask_path.name.startswith(".") or mask_path.suffix.lower() != ".png":
            continue
        match = MASK_NAME.match(mask_path.name)
        if match is None:
            raise DatasetError(f"{mask_path} is not named NAME_K.png (NAME the image's name, K the object's number)")
        image_path = images.get(match["image"])
        if image_path is None:
            raise DatasetError(f"{mask_path} has no image {match['image']}.* in {images_dir}")
        found.append((match["image"], int(match["object"]), mask_path, image_path))
    objects = []
    sizes: dict[Path, tuple[int, int]] = {}
    for _, number, mask_path, image_path in sorted(found, key=lambda item: (item[0], item[1])):
        if image_path not in sizes:
            sizes[image_path] = displayed_size(image_path, max_pixels)
        width, height = sizes[image_path]
        mask_size = displayed_size(mask_path, max_pixels)
        if mask_size != (width, height):
            raise DatasetError(
                f"{mask_path} is {mask_size[0]}x{mask_size[1]} but its image {image_path} is {width}x{height} "
                "(after its EXIF orientation): a mask must have its image's size"
            )
        objects.append(
            DatasetObject(
                image=image_path.name,
                name=str(number),
                location=ImageLocation(path=image_path),
                width=width,
                height=height,
                source=str(mask_path),
                load=lambda mask_path=mask_path: _read_mask_png(mask_path),
            )
        )
    return objects


# -- polygons ---------------------------------------------------------------------------------------------


def _polygon_mask(polygons: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Polygons as flat [x0, y0, x1, y1, ...] pixel coordinates -> their union, rasterised as COCO does."""
    from pycocotools import mask as coco_mask

    rles = coco_mask.frPyObjects([list(map(float, polygon)) for polygon in polygons], height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


# -- Label Studio's brush RLE -----------------------------------------------------------------------------


def _bit_string(rle: Sequence[int]) -> str:
    values = np.asarray(rle)
    if values.ndim != 1 or values.size < 7 or not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() > 255:
        raise ValueError("a brush RLE is a list of bytes (integers 0-255), at least its 7-byte header")
    return (np.unpackbits(values.astype(np.uint8)) + ord("0")).tobytes().decode("ascii")


def decode_brush_rle(rle: Sequence[int]) -> np.ndarray:
    """Label Studio's brush RLE -> its flat uint8 values (RGBA per pixel), as label-studio-converter's
    `brush.decode_rle` returns them (tests compare the two), but from one bit string instead of a Python
    string built bit by bit.

    Header: 32 bits value count, 5 bits word size - 1, 4 x 4 bits the run-length field sizes - 1. Then
    records: 1 bit (1: one value repeated, 0: literal values), 2 bits choosing a field size, that many bits
    run length - 1, then the value (or the literal values), each `word size` bits.
    """
    bits = _bit_string(rle)
    position = 0

    def read(width: int) -> int:
        nonlocal position
        field = bits[position : position + width]
        if len(field) != width:
            raise ValueError("the brush RLE ends in the middle of a record")
        position += width
        return int(field, 2)

    count = read(32)
    word_size = read(5) + 1
    run_sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(count, dtype=np.uint8)
    index = 0
    while index < count:
        repeated = read(1)
        end = index + 1 + read(run_sizes[read(2)])
        if repeated:
            out[index:end] = read(word_size)
            index = end
        else:
            if end > count:
                raise ValueError("a literal run of the brush RLE goes past its value count")
            for i in range(index, end):
                out[i] = read(word_size)
            index = end
    return out


# -- Label Studio JSON export -----------------------------------------------------------------------------


def _file_name_candidates(reference: str) -> list[str]:
    """File names a task's image may have in a local folder: as uploaded (without Label Studio's prefix)."""
    parts = urlsplit(reference)
    if parts.path.rstrip("/").endswith("/data/local-files"):
        name = Path(unquote(parse_qs(parts.query).get("d", [""])[0])).name
    else:
        name = Path(unquote(parts.path)).name
    names = [name] if name else []
    upload = UPLOAD_PREFIX.match(name)
    if upload:
        names.append(upload["name"])
    return names


def _image_reference(task: dict, image_field: str | None, where: str) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise DatasetError(f"{where} has no data")
    if image_field is None:
        if isinstance(data.get("image"), str):
            image_field = "image"
        else:
            strings = [key for key, value in data.items() if isinstance(value, str)]
            if len(strings) != 1:
                raise DatasetError(f"{where}: which data field is the image ({', '.join(sorted(data))})? Say it with --image-field")
            image_field = strings[0]
    reference = data.get(image_field)
    if not isinstance(reference, str) or not reference.strip():
        raise DatasetError(f"{where} has no image in its data field {image_field!r}")
    return reference.strip()


def _chosen_annotation(task: dict) -> dict | None:
    """The ground-truth annotation when one is marked, else the first that was not cancelled."""
    annotations = [a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    marked = [a for a in annotations if a.get("ground_truth")]
    return (marked or annotations or [None])[0]


def _frame(region: dict, where: str, max_pixels: int) -> tuple[int, int]:
    width, height = region.get("original_width"), region.get("original_height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise DatasetError(f"{where} has no original_width/original_height")
    check_frame(width, height, max_pixels, f"{where}: its frame (original_width x original_height)")
    return width, height


def _brush_loader(rle: list, width: int, height: int, where: str) -> Callable[[], GroundTruth]:
    def load() -> GroundTruth:
        try:
            values = decode_brush_rle(rle)
        except ValueError as error:
            raise DatasetError(f"{where}: {error}") from None
        return GroundTruth(object_mask=values.reshape(height, width, 4)[:, :, 3] > 0, ignore_mask=None)

    return load


def _polygon_loader(points: list, width: int, height: int, where: str) -> Callable[[], GroundTruth]:
    try:
        flat = [coordinate for x, y in points for coordinate in (x / 100 * width, y / 100 * height)]
    except OverflowError:  # a whole number beyond a float
        raise DatasetError(f"{where}: a polygon has a coordinate that is not a finite number") from None
    check_outline(flat, width, height, where)

    def load() -> GroundTruth:
        return GroundTruth(object_mask=_polygon_mask([flat], width, height), ignore_mask=None)

    return load


def _region_object(region: dict, where: str, max_pixels: int) -> tuple[int, int, Callable[[], GroundTruth]]:
    width, height = _frame(region, where, max_pixels)
    value = region.get("value") if isinstance(region.get("value"), dict) else {}
    if region["type"] in BRUSH_TYPES:
        rle = value.get("rle")
        if value.get("format", "rle") != "rle" or not isinstance(rle, list):
            raise DatasetError(f"{where} is a brush region without an RLE")
        try:
            count = int(_bit_string(rle)[:32], 2)
        except ValueError as error:
            raise DatasetError(f"{where}: {error}") from None
        if count != width * height * 4:
            raise DatasetError(
                f"{where}: its brush RLE holds {count} values, but {width}x{height} pixels need {width * height * 4}"
            )
        return width, height, _brush_loader(rle, width, height, where)
    points = value.get("points")
    valid = isinstance(points, list) and len(points) >= 3 and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in p)
        for p in points
    )
    if not valid:
        raise DatasetError(f"{where} is a polygon without at least three [x, y] points")
    return width, height, _polygon_loader(points, width, height, where)


def read_label_studio_export(
    export_path: Path, images_dir: Path | None, image_field: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[DatasetObject]:
    tasks = _read_json(export_path)
    if not isinstance(tasks, list):
        raise DatasetError(
            f"{export_path} is not a Label Studio JSON export (a list of tasks); export the project as JSON, not JSON-MIN or COCO"
        )
    if images_dir is not None:
        _require_dir(images_dir, "--images")
    objects = []
    for number, task in enumerate(tasks, start=1):
        task_id = task.get("id") if isinstance(task, dict) else None
        where = f"{export_path} task {task_id if task_id is not None else '#' + str(number)}"
        if not isinstance(task, dict):
            raise DatasetError(f"{where} is not an object")
        annotation = _chosen_annotation(task)
        results = annotation.get("result") if annotation else None
        regions = [
            r for r in results or [] if isinstance(r, dict) and r.get("type") in BRUSH_TYPES + POLYGON_TYPES
        ]
        if not regions:
            continue
        reference = _image_reference(task, image_field, where)
        if images_dir is None:
            location = ImageLocation(reference=reference, task_id=task_id)
        else:
            candidates = _file_name_candidates(reference)
            path = next((images_dir / name for name in candidates if (images_dir / name).is_file()), None)
            if path is None:
                raise DatasetError(
                    f"{where}: its image {reference} is not in {images_dir} (looked for {' or '.join(candidates) or 'a file name'})"
                )
            location = ImageLocation(path=path)
        image_name = (_file_name_candidates(reference) or [reference])[-1]
        for index, region in enumerate(regions, start=1):
            region_name = str(region.get("id") or index)
            region_where = f"{where} region {region_name}"
            width, height, load = _region_object(region, region_where, max_pixels)
            objects.append(
                DatasetObject(
                    image=image_name,
                    name=region_name,
                    location=location,
                    width=width,
                    height=height,
                    source=region_where,
                    load=load,
                )
            )
    return objects


# -- COCO -------------------------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise DatasetError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path} cannot be read as JSON: {error}") from None


def _coco_loader(segmentation, width: int, height: int, where: str) -> Callable[[], GroundTruth]:
    def load() -> GroundTruth:
        from pycocotools import mask as coco_mask

        try:
            if isinstance(segmentation, list):
                mask = _polygon_mask(segmentation, width, height)
            else:
                rle = segmentation
                if isinstance(rle["counts"], list):  # uncompressed RLE
                    rle = coco_mask.frPyObjects(rle, height, width)
                mask = coco_mask.decode(rle).astype(bool)
        except (TypeError, ValueError, KeyError, IndexError) as error:
            raise DatasetError(f"{where}: its segmentation cannot be decoded: {error}") from None
        return GroundTruth(object_mask=mask, ignore_mask=None)

    return load


def read_coco(coco_path: Path, images_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[DatasetObject]:
    coco = _read_json(coco_path)
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or not isinstance(coco.get("annotations"), list):
        raise DatasetError(f"{coco_path} is not a COCO annotation file (an object with 'images' and 'annotations' lists)")
    _require_dir(images_dir, "--images")
    images = {}
    for entry in coco["images"]:
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise DatasetError(f"{coco_path}: an image entry without id or file_name: {str(entry)[:200]}")
        images[entry["id"]] = entry
    by_image: dict = {}
    for annotation in coco["annotations"]:
        where = f"{coco_path} annotation {annotation.get('id') if isinstance(annotation, dict) else annotation!r}"
        if not isinstance(annotation, dict) or "segmentation" not in annotation:
            raise DatasetError(f"{where} has no segmentation")
        if annotation.get("iscrowd"):
            continue
        if annotation.get("image_id") not in images:
            raise DatasetError(f"{where} belongs to image_id {annotation.get('image_id')!r}, which the file does not list")
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    objects = []
    for image_id, image_annotations in by_image.items():
        entry = images[image_id]
        if not _is_inside_folder(entry["file_name"]):
            raise DatasetError(
                f"{coco_path}: image {entry['file_name']!r} (id {image_id}) is not a path under {images_dir} "
                "(absolute, or with '..'): only files under --images are read"
            )
        path = images_dir / entry["file_name"]
        if not path.is_file():
            raise DatasetError(f"{coco_path}: image {entry['file_name']!r} (id {image_id}) is not in {images_dir}")
        width, height = displayed_size(path, max_pixels)
        declared = (entry.get("width"), entry.get("height"))
        if declared != (width, height):
            raise DatasetError(
                f"{coco_path}: image {entry['file_name']!r} is declared {declared[0]}x{declared[1]} but {path} is "
                f"{width}x{height} (after its EXIF orientation)"
            )
        for annotation in image_annotations:
            where = f"{coco_path} annotation {annotation.get('id')}"
            segmentation = annotation["segmentation"]
            if isinstance(segmentation, dict):
                size = segmentation.get("size")
                if list(size or []) != [height, width] or "counts" not in segmentation:
                    raise DatasetError(f"{where}: its RLE is for size {size}, but image {entry['file_name']!r} is {height}x{width} (height, width)")
            elif not (isinstance(segmentation, list) and segmentation and all(isinstance(p, list) and len(p) >= 6 for p in segmentation)):
                raise DatasetError(f"{where}: its polygons need at least three points each")
            else:
                for polygon in segmentation:
                    check_outline(polygon, width, height, where)
            objects.append(
                DatasetObject(
                    image=entry["file_name"],
                    name=str(annotation.get("id")),
                    location=ImageLocation(path=path),
                    width=width,
                    height=height,
                    source=where,
                    load=_coco_loader(segmentation, width, height, where),
                )
            )
    return objects
