"""The label config: parsed once per distinct text, and the questions a request asks of it.

Which image a smart keypoint is on, which data field holds that image, and which region control (BrushLabels,
PolygonLabels or RectangleLabels) answers the keypoint's label. label-studio-ml makes a new model instance for
every request, each with the request's config: the parse is cached here, per process, by the config's digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from segnext_backend.caches import LruCache
from segnext_backend.errors import RequestError, TooLargeError
from segnext_backend.runtime import current_settings

try:  # label-studio-ml 2.x: the parser comes with label-studio-sdk
    from label_studio_sdk._extensions.label_studio_tools.core.label_config import parse_config
except ImportError:  # label-studio-ml 1.0.9: label-studio-tools
    from label_studio_tools.core.label_config import parse_config

# -- the label config ---------------------------------------------------------------------------------------

# Parsed configs by SHA-256 of their text: every click of a project carries the same config. Bounded by the
# bytes of the config texts (the parsed form is a few times larger).
_parsed_configs: LruCache[str, tuple[int, dict]] = LruCache(8 * 1024 * 1024, lambda entry: entry[0])


def parsed_label_config(label_config: str | None) -> dict:
    """The parsed label config (shared between requests: read it, never change it)."""
    if not label_config:
        return {}
    limit = current_settings().max_label_config_bytes
    text = label_config.encode("utf-8", "surrogatepass")
    if len(text) > limit:
        raise TooLargeError(f"the label config is {len(text)} bytes, over the limit of {limit} (MAX_LABEL_CONFIG_BYTES)")
    digest = hashlib.sha256(text).hexdigest()
    return _parsed_configs.get_or_compute(digest, lambda: (len(text), _parse(label_config)))[1]


def _parse(label_config: str) -> dict:
    try:
        return parse_config(label_config)
    except Exception as error:  # noqa: BLE001 - label-studio-tools raises its own XML syntax error, or a KeyError
        raise RequestError(f"the label config could not be parsed: {error}"[:500]) from None


# The controls a click can be answered in: kind (REGION_CONTROL_ORDER's name) -> control tag, region type.
REGION_CONTROLS = {
    "brush": ("BrushLabels", "brushlabels"),
    "polygon": ("PolygonLabels", "polygonlabels"),
    "rectangle": ("RectangleLabels", "rectanglelabels"),
}


@dataclass(frozen=True)
class ImageTarget:
    """Where a smart keypoint's mask goes: the Image tag, its task data field, and the control answered."""

    to_name: str
    data_field: str
    from_name: str
    region_type: str  # brushlabels, polygonlabels or rectanglelabels


def _controls_on(parsed: dict, tag_type: str, to_name: str) -> list[tuple[str, dict]]:
    return [
        (name, info)
        for name, info in parsed.items()
        if info.get("type") == tag_type and to_name in info.get("to_name", [])
    ]


def _image_field(parsed: dict, to_name: str) -> str | None:
    for info in parsed.values():
        for target, source in zip(info.get("to_name", []), info.get("inputs", [])):
            if target == to_name and source.get("type") == "Image":
                return source.get("value")
    return None


def _controls_found(parsed: dict) -> str:
    return ", ".join(f"{name} ({info.get('type')}: {', '.join(info.get('labels', []))})" for name, info in parsed.items())


def require_interactive_config(parsed: dict, region_order: tuple[str, ...]) -> None:
    """A clear error for label configs that cannot work with this backend at all."""
    types = {info.get("type") for info in parsed.values()}
    inputs = {source.get("type") for info in parsed.values() for source in info.get("inputs", [])}
    region_tags = [REGION_CONTROLS[kind][0] for kind in region_order]
    missing = [
        what
        for what, present in (
            ("an <Image> tag", "Image" in inputs),
            ("a " + " or ".join(f"<{tag}>" for tag in region_tags) + " control", bool(types & set(region_tags))),
            ("a <KeyPointLabels smart=\"true\"> control", "KeyPointLabels" in types),
        )
        if not present
    ]
    if missing:
        raise RequestError(
            "the label config needs " + ", ".join(missing) + f" (controls found: {_controls_found(parsed) or 'none'};"
            f" answered: REGION_CONTROL_ORDER={','.join(region_order)}; see the README for configs to paste)"
        )


def image_target(parsed: dict, to_name: str, label: str, region_order: tuple[str, ...]) -> ImageTarget:
    """The control on the image that answers `label`: the first kind in `region_order` with a control carrying
    the label, and of several such controls of that kind, the first in the config."""
    data_field = _image_field(parsed, to_name)
    if data_field is None:
        raise RequestError(f"the label config has no <Image name=\"{to_name}\"> for the keypoints' toName")
    for kind in region_order:
        tag, region_type = REGION_CONTROLS[kind]
        for name, info in _controls_on(parsed, tag, to_name):
            if label in info.get("labels", []):
                return ImageTarget(to_name=to_name, data_field=data_field, from_name=name, region_type=region_type)
    raise RequestError(
        f"no control on the image '{to_name}' that this backend answers carries the label {label!r} "
        f"(controls found: {_controls_found(parsed)}; answered: REGION_CONTROL_ORDER={','.join(region_order)})"
    )


def require_answerable_config(parsed: dict, region_order: tuple[str, ...]) -> None:
    """What /setup checks, so that the person adding the model learns what a click would fail on (Label Studio
    shows an annotator nothing of a click's error): `require_interactive_config`, and for every label of every
    KeyPointLabels control, on every image it points at, the control that answers it (the error a click with
    that label would get)."""
    require_interactive_config(parsed, region_order)
    for info in parsed.values():
        if info.get("type") == "KeyPointLabels":
            for to_name in info.get("to_name", []):
                for label in info.get("labels", []):
                    image_target(parsed, to_name, label, region_order)
