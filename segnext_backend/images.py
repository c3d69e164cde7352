"""Task images: where they are, how to fetch them safely, and how to turn them into RGB pixels.

Where an image is (`ImageSource.locate`):
- Label Studio paths (`/data/upload/1/x.png`, `/data/local-files/?d=...`) are fetched from `LABEL_STUDIO_URL`
  with the API key; local files are read from disk instead when `LOCAL_FILES_DOCUMENT_ROOT` is set, and
  never from outside that root.
- Cloud storage URIs (`s3://`, `gs://`, `azure-blob://`) are fetched through Label Studio's presign endpoint
  for the task, which redirects to a short-lived signed URL.
- Other http(s) URLs are fetched as they are, without the key; hosts on loopback, link-local or private
  addresses are refused unless allowed, so that a task cannot make the backend probe its network. The name
  is checked before connecting (for a clear message), and the address each connection actually reaches is
  checked again before anything is sent: a name may resolve to a public address for the first check and to
  a private one for the connection (DNS rebinding). Through an HTTP(S) proxy only the first check applies,
  since the proxy makes the connection.

How: the Label Studio key goes to the Label Studio host only (redirects are followed by hand, and never
with the key to another host); downloads have time-outs and a byte limit and are kept in a byte-bounded
cache; images over a pixel limit are refused from their header, before decoding. The EXIF orientation is
applied, because the browser shows the image rotated and the clicks are in that frame; every mode (L, LA,
P, RGBA, I;16, CMYK, ...) becomes 8-bit RGB.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .caches import LruCache
from .errors import ImageTooLargeError, ImageUnavailableError, RequestError

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_MAX_REDIRECTS = 5
_RETRY_STATUSES = (500, 502, 503, 504)
_RETRY_DELAY_SECONDS = 0.3
_DRAFT_MIN_SIZE = 1024  # the model frame: a draft decode never goes below it
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")


@dataclass(frozen=True)
class ImageFetchConfig:
    label_studio_url: str = ""
    label_studio_api_key: str = ""
    local_files_document_root: str = ""
    allow_private_hosts: bool = False
    max_bytes: int = 100 * 1024 * 1024
    max_pixels: int = 100_000_000
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    download_cache_bytes: int = 256 * 1024 * 1024
    # Decode JPEGs at a reduced size (Pillow's draft: DCT scaling by 1/2, 1/4 or 1/8, never below 1024 px):
    # several times faster for large photos, but the encoder then sees another input than upstream's.
    fast_jpeg_decode: bool = False


@dataclass(frozen=True)
class ImageRef:
    """Where one image is. Equal refs are the same image: this is its key in the feature cache.

    kind "url": an http(s) URL; "local": a path under LOCAL_FILES_DOCUMENT_ROOT; "cloud": a storage URI,
    fetched through the presign endpoint of `task_id` (any task that holds the URI will do, so the task is
    not part of the image's identity).
    """

    kind: str
    location: str
    task_id: int | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return self.location


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 address may carry a %zone
    return ip.is_global and not ip.is_multicast


def _non_public_host_refused(host: str, address: str) -> RequestError:
    return RequestError(
        f"the image host {host} is on a non-public address ({address}): refused; set "
        "ALLOW_PRIVATE_IMAGE_HOSTS=true to fetch images from your own network"
    )


class _PublicPeerOnly:
    """A urllib3 connection that refuses to go on when its socket reached a non-public address."""

    def _new_conn(self):
        sock = super()._new_conn()
        address = sock.getpeername()[0]
        if not _is_public(address):
            sock.close()
            # Not an OSError: urllib3 would take it for a network failure and retry it.
            raise _non_public_host_refused(self.host, address)
        return sock


class _PublicHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = type("PublicHTTPConnection", (_PublicPeerOnly, HTTPConnection), {})


class _PublicHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = type("PublicHTTPSConnection", (_PublicPeerOnly, HTTPSConnection), {})


class _PublicAddressesOnly(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _PublicHTTPConnectionPool, "https": _PublicHTTPSConnectionPool}


def _get_streamed(url: str, headers: dict, timeout: tuple[float, float], public_only: bool) -> requests.Response:
    """`requests.get`, streamed and without redirects; with `public_only`, only public addresses are reached."""
    with requests.Session() as session:
        if public_only:
            session.mount("http://", _PublicAddressesOnly())
            session.mount("https://", _PublicAddressesOnly())
        return session.get(url, headers=headers, timeout=timeout, stream=True, allow_redirects=False)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default_port


def _is_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified: only used to refresh before Label Studio would refuse it."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        return float(json.loads(base64.urlsafe_b64decode(payload))["exp"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class LabelStudioAuth:
    """The Authorization header for Label Studio, for either kind of token it issues.

    A legacy token is sent as `Token <key>`. A personal access token is a JWT refresh token: it is exchanged
    at `/api/token/refresh/` for an access token (valid 5 minutes), sent as `Bearer <access>`, refreshed a
    little before it expires, and once more when Label Studio answers 401.
    """

    _REFRESH_MARGIN_SECONDS = 30

    def __init__(self, label_studio_url: str, api_key: str, timeout: tuple[float, float]):
        self.label_studio_url = label_studio_url
        self.api_key = api_key
        self.timeout = timeout
        self._access: str | None = None
        self._access_expires = 0.0
        self._lock = threading.Lock()

    @property
    def is_personal_access_token(self) -> bool:
        return _is_jwt(self.api_key)

    def header(self, *, force_refresh: bool = False) -> dict:
        if not self.api_key:
            return {}
        if not self.is_personal_access_token:
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if force_refresh or self._access is None or time.time() > self._access_expires - self._REFRESH_MARGIN_SECONDS:
                self._refresh_locked()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh_locked(self) -> None:
        host = urlsplit(self.label_studio_url).netloc
        try:
            response = requests.post(
                self.label_studio_url + "/api/token/refresh/", json={"refresh": self.api_key}, timeout=self.timeout
            )
        except requests.RequestException as error:
            raise ImageUnavailableError(f"exchanging the personal access token at {host} failed: {type(error).__name__}") from None
        if response.status_code != 200:
            raise ImageUnavailableError(
                f"Label Studio at {host} refused the personal access token (HTTP {response.status_code}): "
                "check LABEL_STUDIO_API_KEY"
            )
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise ImageUnavailableError(f"Label Studio at {host} answered the token refresh without an access token") from None
        self._access = access
        self._access_expires = _jwt_expiry(access) or time.time() + 240


class ImageSource:
    """Locates, fetches and decodes task images. Thread-safe."""

    def __init__(self, config: ImageFetchConfig):
        self.config = config
        self.timeout = (config.connect_timeout, config.read_timeout)
        self.auth = LabelStudioAuth(config.label_studio_url, config.label_studio_api_key, self.timeout)
        self.downloads: LruCache[ImageRef, bytes] = LruCache(config.download_cache_bytes, len)

    # -- where ---------------------------------------------------------------------------------------------

    def locate(self, image_ref, task_id: int | None = None) -> ImageRef:
        """The ImageRef of a task's image field. Raises RequestError for what can never be fetched."""
        if not isinstance(image_ref, str) or not image_ref.strip():
            raise RequestError("the task's image field is empty or not a string")
        image_ref = image_ref.strip()
        scheme = urlsplit(image_ref).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            self._require_label_studio(image_ref)
            if task_id is None:
                raise RequestError(f"the cloud storage URI {image_ref!r} needs its task's id to be presigned")
            return ImageRef("cloud", image_ref, task_id)
        if scheme in ("http", "https"):
            return self._http_or_local(image_ref)
        if scheme:
            raise RequestError(f"image URL scheme {scheme!r} is not supported (use http, https, s3, gs, azure-blob or a Label Studio path)")
        if not image_ref.startswith("/"):
            raise RequestError(f"image reference {image_ref!r} is neither a URL nor a Label Studio path")
        self._require_label_studio(image_ref)
        return self._http_or_local(urljoin(self.config.label_studio_url + "/", image_ref.lstrip("/")))

    def _require_label_studio(self, image_ref: str) -> None:
        if not self.config.label_studio_url:
            raise RequestError(
                f"the image {image_ref!r} is served by Label Studio: set LABEL_STUDIO_URL (and LABEL_STUDIO_API_KEY) "
                "so that the backend can fetch it"
            )

    def _http_or_local(self, url: str) -> ImageRef:
        parts = urlsplit(url)
        if self._is_label_studio(url) and parts.path.rstrip("/").endswith("/data/local-files") and self.config.local_files_document_root:
            relative = parse_qs(parts.query).get("d", [""])[0]
            return ImageRef("local", str(self._local_path(relative)))
        return ImageRef("url", url)

    def _local_path(self, relative: str) -> Path:
        root = Path(self.config.local_files_document_root).resolve()
        relative = unquote(relative)
        if not relative or relative.startswith("/") or "\x00" in relative:
            raise RequestError(f"local file path {relative!r} must be relative to LOCAL_FILES_DOCUMENT_ROOT")
        path = (root / relative).resolve()  # resolves '..' and symbolic links
        if not path.is_relative_to(root):
            raise RequestError(f"local file path {relative!r} is outside LOCAL_FILES_DOCUMENT_ROOT")
        return path

    def _is_label_studio(self, url: str) -> bool:
        return bool(self.config.label_studio_url) and _origin(url) == _origin(self.config.label_studio_url)

    def _check_host_allowed(self, url: str) -> None:
        """Refuse hosts that resolve to loopback, link-local, private or reserved addresses (SSRF)."""
        if not self._public_only(url):
            return
        parts = urlsplit(url)
        host = parts.hostname or ""
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 80, proto=socket.IPPROTO_TCP)}
        except (socket.gaierror, UnicodeError):
            raise ImageUnavailableError(f"the image host {host!r} could not be resolved") from None
        for address in sorted(addresses):
            if not _is_public(address):
                raise _non_public_host_refused(host, address)

    def _public_only(self, url: str) -> bool:
        return not (self.config.allow_private_hosts or self._is_label_studio(url))

    # -- fetch ---------------------------------------------------------------------------------------------

    def fetch(self, ref: ImageRef) -> bytes:
        """The image's bytes (from the download cache when it has them)."""
        return self.downloads.get_or_compute(ref, lambda: self._fetch_uncached(ref))

    def _fetch_uncached(self, ref: ImageRef) -> bytes:
        if ref.kind == "local":
            return self._read_local(Path(ref.location))
        if ref.kind == "cloud":
            fileuri = base64.urlsafe_b64encode(ref.location.encode()).decode()
            url = f"{self.config.label_studio_url}/tasks/{ref.task_id}/presign/?fileuri={quote(fileuri)}"
            return self._get(url)
        return self._get(ref.location)

    def _read_local(self, path: Path) -> bytes:
        try:
            size = path.stat().st_size
            if size > self.config.max_bytes:
                raise ImageTooLargeError(f"the local file is {size} bytes, over the limit of {self.config.max_bytes} (MAX_IMAGE_BYTES)")
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageUnavailableError(f"the local file {path.name!r} does not exist under LOCAL_FILES_DOCUMENT_ROOT") from None
        except (IsADirectoryError, PermissionError) as error:
            raise ImageUnavailableError(f"the local file {path.name!r} cannot be read: {type(error).__name__}") from None

    def _get(self, url: str) -> bytes:
        """GET with redirects followed by hand: the key goes to Label Studio only, every hop is checked."""
        for _ in range(_MAX_REDIRECTS + 1):
            self._check_host_allowed(url)
            to_label_studio = self._is_label_studio(url)
            response = self._request(url, to_label_studio)
            if response.is_redirect:
                location = response.headers.get("Location", "")
                response.close()
                url = urljoin(url, location)
                if urlsplit(url).scheme not in ("http", "https"):
                    raise RequestError(f"the image redirect leads to an unsupported scheme: {urlsplit(url).scheme!r}")
                continue
            with response:
                return self._read_body(response, to_label_studio)
        raise ImageUnavailableError(f"fetching the image took more than {_MAX_REDIRECTS} redirects")

    def _request(self, url: str, to_label_studio: bool) -> requests.Response:
        """One GET, retried once after a refused connection or a 5xx (a restarting Label Studio, a busy
        proxy); a time-out is not retried, since waiting twice as long helps nobody."""
        host = urlsplit(url).netloc
        public_only = self._public_only(url)
        for attempt in (1, 2):
            try:
                headers = self.auth.header() if to_label_studio else {}
                response = _get_streamed(url, headers, self.timeout, public_only)
                if response.status_code == 401 and to_label_studio and self.auth.is_personal_access_token:
                    response.close()  # the access token may have expired early: refresh once and retry
                    headers = self.auth.header(force_refresh=True)
                    response = _get_streamed(url, headers, self.timeout, public_only)
            except requests.Timeout:
                raise ImageUnavailableError(f"fetching the image from {host} timed out") from None
            except requests.ConnectionError as error:
                if attempt == 1:
                    time.sleep(_RETRY_DELAY_SECONDS)
                    continue
                raise ImageUnavailableError(f"fetching the image from {host} failed: {type(error).__name__}") from None
            except requests.RequestException as error:
                raise ImageUnavailableError(f"fetching the image from {host} failed: {type(error).__name__}") from None
            if response.status_code in _RETRY_STATUSES and attempt == 1:
                response.close()
                time.sleep(_RETRY_DELAY_SECONDS)
                continue
            return response
        raise AssertionError("unreachable")

    def _read_body(self, response: requests.Response, to_label_studio: bool) -> bytes:
        host = urlsplit(response.url).netloc
        if response.status_code != 200:
            hint = " (check LABEL_STUDIO_API_KEY)" if response.status_code in (401, 403) and to_label_studio else ""
            raise ImageUnavailableError(f"fetching the image from {host} failed: HTTP {response.status_code}{hint}")
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.config.max_bytes:
            raise ImageTooLargeError(
                f"the image at {host} is {int(declared)} bytes, over the limit of {self.config.max_bytes} (MAX_IMAGE_BYTES)"
            )
        body = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK):
                body += chunk
                if len(body) > self.config.max_bytes:
                    raise ImageTooLargeError(f"the image at {host} is over the limit of {self.config.max_bytes} bytes (MAX_IMAGE_BYTES)")
        except requests.Timeout:
            raise ImageUnavailableError(f"fetching the image from {host} timed out") from None
        except requests.RequestException as error:
            raise ImageUnavailableError(f"fetching the image from {host} failed: {type(error).__name__}") from None
        return bytes(body)

    # -- decode --------------------------------------------------------------------------------------------

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
        if self.config.fast_jpeg_decode and image.format == "JPEG":
            # Only the features depend on these pixels: the mask follows the frame Label Studio reports.
            image.draft("RGB", (_DRAFT_MIN_SIZE, _DRAFT_MIN_SIZE))
        try:
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise ImageUnavailableError(f"the image could not be decoded: {error}") from None

    def load(self, ref: ImageRef) -> np.ndarray:
        return self.decode(self.fetch(ref))


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
