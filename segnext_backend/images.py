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
with the key to another host); downloads have time-outs (per connection, per read, and a total deadline that
a server trickling bytes cannot stretch) and a byte limit; images over a pixel limit are refused from their
header, before decoding, and decodes share a pixel budget so that several large images at once cannot
exhaust memory.

Which content (`ImageSource.current`): an image is identified by the SHA-256 of its bytes (`ImageVersion`),
and features and click states are keyed by that, never by the place alone. What is at a place (URL, local
path, cloud URI and task) is trusted for `revalidate_seconds` after it was last checked; the next use after
that asks again: a conditional GET with the ETag / Last-Modified the host gave (a 304 costs no download), a
full GET where it gave neither (the digest decides), a `stat` for a local file. So new content at the same
place is answered with the old content's mask for at most `revalidate_seconds` (IMAGE_REVALIDATE_SECONDS). The EXIF orientation is
applied, because the browser shows the image rotated and the clicks are in that frame; every mode (L, LA,
P, RGBA, I;16, CMYK, ...) becomes 8-bit RGB.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import socket
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from stat import S_ISREG
from urllib.parse import parse_qs, quote, unquote, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .addresses import is_public
from .budgets import PixelBudget
from .caches import LruCache
from .errors import ImageTooLargeError, ImageUnavailableError, RequestError, TooLargeError
from .settings import redact_url

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
    # A whole download (every redirect, retry and read) ends after this many seconds.
    download_timeout: float = 120.0
    # What is at a place is trusted this long after it was checked (see the module's docstring).
    revalidate_seconds: float = 60.0
    # Pixels decoded (and held as RGB until encoded) at once, over all requests.
    decode_pixel_budget: int = 100_000_000
    # Decode JPEGs at a reduced size (Pillow's draft: DCT scaling by 1/2, 1/4 or 1/8, never below 1024 px):
    # several times faster for large photos, but the encoder then sees another input than upstream's.
    fast_jpeg_decode: bool = False
    # Longer image references (URL, path, cloud URI) are refused: each is kept while its place is remembered.
    max_reference_length: int = 16384
    # Memory for what was found at which place (`ImageSource.current`), least recently used out first.
    places_memory_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class ImageRef:
    """Where one image is. Equal refs are the same place; what is there now is `ImageSource.current`.

    kind "url": an http(s) URL; "local": a path under LOCAL_FILES_DOCUMENT_ROOT; "cloud": a storage URI,
    fetched through the presign endpoint of `task_id`. The task is part of a cloud ref's identity: Label
    Studio resolves the URI with the storages of the task's project, so another task (another project) may
    get other bytes for the same URI, and they must never be taken for this task's.
    """

    kind: str
    location: str
    task_id: int | None = None

    def __str__(self) -> str:
        return redact_url(self.location)


@dataclass(frozen=True)
class ImageVersion:
    """One content of an image: the key of its features and click states. Equal digests are equal images,
    wherever they were fetched from (`ref` is the place it was last seen at, for fetching it again)."""

    sha256: str
    ref: ImageRef = field(compare=False)

    def __str__(self) -> str:
        return f"sha256:{self.sha256}"


@dataclass(frozen=True)
class _Checked:
    """What was found at a place, when (time.monotonic()), and how to ask the host whether it changed."""

    version: ImageVersion
    validators: dict
    checked_at: float


_PLACE_OVERHEAD_BYTES = 600  # one remembered place's objects besides its strings (measured: 580 on CPython 3.11)


def _place_bytes(ref: "ImageRef", checked: "_Checked") -> int:
    """What remembering one place costs: its reference and the validators the host sent (headers of up
    to 64 KB each) are the parts a request or a host chooses."""
    strings = [ref.location, *checked.validators.values()]
    return _PLACE_OVERHEAD_BYTES + sum(sys.getsizeof(value) for value in strings)


def task_id_for_presign(task_id) -> int:
    """The task id as it may go into the presign URL: a positive whole number, nothing else."""
    if isinstance(task_id, str) and task_id.isascii() and task_id.isdigit():
        task_id = int(task_id)
    if isinstance(task_id, bool) or not isinstance(task_id, int) or not 1 <= task_id < 2**63:
        raise RequestError(f"the task id must be a positive whole number, got {str(task_id)[:40]!r}")
    return task_id


def host_of(url: str) -> str:
    """host[:port] of a URL for messages and logs: never the user and password a URL may carry."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port else host


class _Deadline:
    """The total time limit of one download. A read time-out bounds each wait for data, so a server that
    sends a byte just before each one expires is never timed out; at this deadline every socket the download
    opened is shut down, which ends a blocked read at once. Sockets register themselves through the
    connection classes below, for the thread that runs the download."""

    _running: dict[int, "_Deadline"] = {}  # thread ident -> the deadline of the download it runs

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self.aborted = False  # ended by abort_download, not by the clock
        self.ends_at = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._waiting: list[threading.Event] = []  # calls in _within_deadline, woken at the deadline
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        _Deadline._running[threading.get_ident()] = self
        self.ends_at = time.monotonic() + self.seconds
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()
        _Deadline._running.pop(threading.get_ident(), None)

    @classmethod
    def track(cls, sock: socket.socket) -> None:
        deadline = cls._running.get(threading.get_ident())
        if deadline is None:
            return
        with deadline._lock:
            deadline._sockets.append(sock)
            if deadline.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)
            for event in self._waiting:
                event.set()


def _within_deadline(call, *args, **kwargs):
    """`call(*args, **kwargs)`, given up at the running download's deadline: for name resolution (the system
    resolver's own time-outs, several seconds per name server and search domain, are no bound of ours) and the
    connection made with it. The call goes on in a helper thread until the resolver gives up; a socket it then
    returns is closed. Without a download running, called as it is."""
    deadline = _Deadline._running.get(threading.get_ident())
    if deadline is None:
        return call(*args, **kwargs)
    outcome: dict = {}
    finished = threading.Event()
    lock = threading.Lock()

    def run() -> None:
        try:
            value = call(*args, **kwargs)
        except BaseException as error:  # handed to the waiting thread
            outcome["error"] = error
        else:
            with lock:
                if outcome.get("abandoned"):
                    if isinstance(value, socket.socket):
                        value.close()
                    return
                outcome["value"] = value
        finished.set()

    with deadline._lock:
        if deadline.expired:
            raise TimeoutError("the download's deadline has passed")
        deadline._waiting.append(finished)
    threading.Thread(target=run, name="name-lookup", daemon=True).start()
    try:
        finished.wait(max(0.0, deadline.ends_at - time.monotonic()))
        with lock:
            if "value" in outcome:
                return outcome["value"]
            if "error" in outcome:
                raise outcome["error"]
            outcome["abandoned"] = True
    finally:
        with deadline._lock:
            deadline._waiting.remove(finished)
    deadline._expire()  # the timer may not have fired yet: the caller must see the deadline as passed
    raise TimeoutError("the download's deadline passed while resolving or connecting")


def abort_download(thread: threading.Thread) -> None:
    """End the download that `thread` runs now, if any, as if its deadline had passed."""
    deadline = _Deadline._running.get(thread.ident)
    if deadline is not None:
        deadline.aborted = True
        deadline._expire()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _non_public_host_refused(host: str, address: str) -> RequestError:
    return RequestError(
        f"the image host {host} is on a non-public address ({address}): refused; set "
        "ALLOW_PRIVATE_IMAGE_HOSTS=true to fetch images from your own network"
    )


class _DeadlineTracked:
    """A urllib3 connection whose socket the running download's deadline can shut down."""

    def _new_conn(self):
        sock = _within_deadline(super()._new_conn)  # name lookup and connect
        _Deadline.track(sock)
        return sock


class _PublicPeerOnly(_DeadlineTracked):
    """A urllib3 connection that refuses to go on when its socket reached a non-public address."""

    def _new_conn(self):
        sock = super()._new_conn()
        address = sock.getpeername()[0]
        if not is_public(address):
            sock.close()
            # Not an OSError: urllib3 would take it for a network failure and retry it.
            raise _non_public_host_refused(self.host, address)
        return sock


def _pool(base, connection_mixin, name: str):
    return type(name, (base,), {"ConnectionCls": type(name + "Connection", (connection_mixin, base.ConnectionCls), {})})


_POOLS = {
    True: {
        "http": _pool(HTTPConnectionPool, _PublicPeerOnly, "PublicHTTP"),
        "https": _pool(HTTPSConnectionPool, _PublicPeerOnly, "PublicHTTPS"),
    },
    False: {
        "http": _pool(HTTPConnectionPool, _DeadlineTracked, "TrackedHTTP"),
        "https": _pool(HTTPSConnectionPool, _DeadlineTracked, "TrackedHTTPS"),
    },
}


class _CheckedAdapter(HTTPAdapter):
    def __init__(self, public_only: bool):
        self.public_only = public_only
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS[self.public_only])


def _get_streamed(url: str, headers: dict, timeout: tuple[float, float], public_only: bool) -> requests.Response:
    """`requests.get`, streamed and without redirects, its sockets under the download's deadline; with
    `public_only`, only public addresses are reached."""
    with requests.Session() as session:
        session.mount("http://", _CheckedAdapter(public_only))
        session.mount("https://", _CheckedAdapter(public_only))
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
        host = host_of(self.label_studio_url)
        try:
            # Never redirected: a 307/308 would re-post the refresh token to wherever it points.
            response = requests.post(
                self.label_studio_url + "/api/token/refresh/",
                json={"refresh": self.api_key},
                timeout=self.timeout,
                allow_redirects=False,
            )
        except requests.RequestException as error:
            raise ImageUnavailableError(f"exchanging the personal access token at {host} failed: {type(error).__name__}") from None
        if response.is_redirect:
            raise ImageUnavailableError(
                f"Label Studio at {host} answered the token refresh with a redirect (HTTP {response.status_code}), "
                "which is not followed with the token: set LABEL_STUDIO_URL to the address Label Studio is served at"
            )
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
        self.downloads: LruCache[str, bytes] = LruCache(config.download_cache_bytes, len)  # by SHA-256
        self.decode_budget = PixelBudget(config.decode_pixel_budget)
        self._checked: OrderedDict[ImageRef, _Checked] = OrderedDict()  # place -> content, least recent first
        self._checked_bytes = 0  # _place_bytes summed over _checked, at most config.places_memory_bytes
        self._checking: dict[ImageRef, Future] = {}
        self._lock = threading.Lock()
        # Bytes just fetched that the download cache could not keep (over its budget), for the same thread's
        # decode that follows: so that even without a download cache an image is fetched once per encode.
        self._unkept = threading.local()

    # -- where ---------------------------------------------------------------------------------------------

    def locate(self, image_ref, task_id: int | None = None) -> ImageRef:
        """The ImageRef of a task's image field. Raises RequestError for what can never be fetched."""
        if not isinstance(image_ref, str) or not image_ref.strip():
            raise RequestError("the task's image field is empty or not a string")
        image_ref = image_ref.strip()
        if len(image_ref) > self.config.max_reference_length:
            raise TooLargeError(
                f"the task's image reference is {len(image_ref)} characters long, over the limit of "
                f"{self.config.max_reference_length} (MAX_IMAGE_URL_LENGTH)"
            )
        scheme = urlsplit(image_ref).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            self._require_label_studio(image_ref)
            if task_id is None:
                raise RequestError(f"the cloud storage URI {image_ref!r} needs its task's id to be presigned")
            return ImageRef("cloud", image_ref, task_id_for_presign(task_id))
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
            addresses = {info[4][0] for info in _within_deadline(socket.getaddrinfo, host, parts.port or 80, proto=socket.IPPROTO_TCP)}
        except (socket.gaierror, UnicodeError):
            raise ImageUnavailableError(f"the image host {host!r} could not be resolved") from None
        for address in sorted(addresses):
            if not is_public(address):
                raise _non_public_host_refused(host, address)

    def _public_only(self, url: str) -> bool:
        return not (self.config.allow_private_hosts or self._is_label_studio(url))

    # -- which content, and fetch -------------------------------------------------------------------------

    def current(self, ref: ImageRef) -> ImageVersion:
        """The content at `ref` now: remembered for `revalidate_seconds` after it was checked, then checked
        again (one request at a time per place: the others wait for its answer)."""
        self._unkept.data = None
        with self._lock:
            known = self._checked.get(ref)
            if known is not None and time.monotonic() - known.checked_at < self.config.revalidate_seconds:
                self._checked.move_to_end(ref)
                return known.version
            future = self._checking.get(ref)
            owner = future is None
            if owner:
                future = self._checking[ref] = Future()
        if not owner:
            return future.result()
        try:
            version = self._check(ref, known)
        except BaseException as error:
            with self._lock:
                del self._checking[ref]
            future.set_exception(error)
            raise
        with self._lock:
            del self._checking[ref]
        future.set_result(version)
        return version

    def _check(self, ref: ImageRef, known: _Checked | None) -> ImageVersion:
        started = time.monotonic()
        data, validators = self._fetch_uncached(ref, known.validators if known else {})
        if data is None:  # not modified since it was checked
            checked = replace(known, checked_at=started)
        else:
            version = ImageVersion(hashlib.sha256(data).hexdigest(), ref)
            self.downloads.put(version.sha256, data)
            if version.sha256 not in self.downloads:
                self._unkept.data = (version.sha256, data)
            checked = _Checked(version, validators, started)
            if known is not None and known.version != version:
                logger.info("the image at %s changed: its new content is %s", ref, version)
        with self._lock:
            self._forget_locked(ref)
            size = _place_bytes(ref, checked)
            if size <= self.config.places_memory_bytes:
                self._checked[ref] = checked
                self._checked_bytes += size
            while self._checked_bytes > self.config.places_memory_bytes:
                self._forget_locked(next(iter(self._checked)))
        return checked.version

    def _forget_locked(self, ref: ImageRef) -> None:
        forgotten = self._checked.pop(ref, None)
        if forgotten is not None:
            self._checked_bytes -= _place_bytes(ref, forgotten)

    def bytes_of(self, version: ImageVersion) -> bytes:
        """The bytes of this content: from the download cache, or fetched again from where it was seen."""

        def fetch_again() -> bytes:
            unkept, self._unkept.data = getattr(self._unkept, "data", None), None
            if unkept is not None and unkept[0] == version.sha256:
                return unkept[1]
            data, _ = self._fetch_uncached(version.ref, {})
            if hashlib.sha256(data).hexdigest() != version.sha256:
                with self._lock:
                    self._forget_locked(version.ref)  # the next use looks again
                raise ImageUnavailableError(f"the image at {version.ref} changed while it was being read: click again")
            return data

        return self.downloads.get_or_compute(version.sha256, fetch_again)

    def fetch(self, ref: ImageRef) -> bytes:
        """The bytes at `ref` now (see `current`)."""
        return self.bytes_of(self.current(ref))

    def _fetch_uncached(self, ref: ImageRef, validators: dict) -> tuple[bytes | None, dict]:
        """(bytes, validators to ask later whether they changed); (None, validators) when `validators` show
        that nothing changed."""
        if ref.kind == "local":
            return self._read_local(Path(ref.location), validators)
        if ref.kind == "cloud":
            fileuri = base64.urlsafe_b64encode(ref.location.encode()).decode()
            task_id = task_id_for_presign(ref.task_id)  # a ref built by hand gets the same check as locate's
            url = f"{self.config.label_studio_url}/tasks/{task_id}/presign/?fileuri={quote(fileuri)}"
            return self._get(url, validators)
        return self._get(ref.location, validators)

    def _read_local(self, path: Path, validators: dict) -> tuple[bytes | None, dict]:
        """A regular file's bytes, at most MAX_IMAGE_BYTES, within IMAGE_DOWNLOAD_TIMEOUT. Anything else under
        the root (a FIFO, which would block the reading thread forever; a device such as /dev/zero, which
        reports size 0 and never ends; a folder) is refused before a byte is read: it is opened without
        blocking and without following a symbolic link planted since `locate` resolved the path, and
        fstat-ed, so what is checked is what is read."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ImageUnavailableError(f"the local file {path.name!r} does not exist under LOCAL_FILES_DOCUMENT_ROOT") from None
        except OSError as error:  # permissions, a symbolic link (ELOOP), too many open files, ...
            raise ImageUnavailableError(f"the local file {path.name!r} cannot be read: {type(error).__name__}") from None
        try:
            stat = os.fstat(fd)
            if not S_ISREG(stat.st_mode):
                raise ImageUnavailableError(
                    f"the local file {path.name!r} is not a regular file (a folder, FIFO, socket or device): refused"
                )
            now = {"stat": (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)}
            if validators and validators == now:
                return None, validators
            if stat.st_size > self.config.max_bytes:
                raise ImageTooLargeError(f"the local file is {stat.st_size} bytes, over the limit of {self.config.max_bytes} (MAX_IMAGE_BYTES)")
            os.set_blocking(fd, True)  # a regular file: reads return data or its end
            return self._read_limited(fd, path), now
        except OSError as error:  # an I/O error mid-read
            raise ImageUnavailableError(f"the local file {path.name!r} cannot be read: {type(error).__name__}") from None
        finally:
            os.close(fd)

    def _read_limited(self, fd: int, path: Path) -> bytes:
        """At most MAX_IMAGE_BYTES (a file may grow after its fstat), within IMAGE_DOWNLOAD_TIMEOUT (a slow
        network file system is checked between reads)."""
        deadline = time.monotonic() + self.config.download_timeout
        body = bytearray()
        while chunk := os.read(fd, _CHUNK):
            body += chunk
            if len(body) > self.config.max_bytes:
                raise ImageTooLargeError(f"the local file {path.name!r} is over the limit of {self.config.max_bytes} bytes (MAX_IMAGE_BYTES)")
            if time.monotonic() > deadline:
                raise ImageUnavailableError(
                    f"reading the local file {path.name!r} took longer than {self.config.download_timeout:g} s (IMAGE_DOWNLOAD_TIMEOUT)"
                )
        return bytes(body)

    def _get(self, url: str, validators: dict) -> tuple[bytes | None, dict]:
        """GET under the total deadline (IMAGE_DOWNLOAD_TIMEOUT), conditional when there are validators."""
        with _Deadline(self.config.download_timeout) as deadline:
            try:
                result = self._get_following_redirects(url, validators)
            except (RequestError, requests.RequestException, OSError):
                if not deadline.expired:
                    raise
            else:  # a connection shut at the deadline may also read as a short, complete-looking answer
                if not deadline.expired:
                    return result
        if deadline.aborted:
            raise ImageUnavailableError(f"fetching the image from {host_of(url)} was stopped: the process is stopping")
        raise ImageUnavailableError(
            f"fetching the image from {host_of(url)} took longer than {self.config.download_timeout:g} s "
            "(IMAGE_DOWNLOAD_TIMEOUT)"
        )

    def _get_following_redirects(self, url: str, validators: dict) -> tuple[bytes | None, dict]:
        """GET with redirects followed by hand: the key goes to Label Studio only, every hop is checked."""
        conditional = {name: value for name, value in validators.items() if name in ("If-None-Match", "If-Modified-Since")}
        for _ in range(_MAX_REDIRECTS + 1):
            self._check_host_allowed(url)
            to_label_studio = self._is_label_studio(url)
            response = self._request(url, to_label_studio, conditional)
            if response.is_redirect:
                location = response.headers.get("Location", "")
                response.close()
                url = urljoin(url, location)
                if urlsplit(url).scheme not in ("http", "https"):
                    raise RequestError(f"the image redirect leads to an unsupported scheme: {urlsplit(url).scheme!r}")
                continue
            with response:
                if response.status_code == 304 and conditional:
                    return None, validators
                data = self._read_body(response, to_label_studio)
                found = {"If-None-Match": response.headers.get("ETag"), "If-Modified-Since": response.headers.get("Last-Modified")}
                return data, {name: value for name, value in found.items() if value}
        raise ImageUnavailableError(f"fetching the image took more than {_MAX_REDIRECTS} redirects")

    def _request(self, url: str, to_label_studio: bool, conditional: dict) -> requests.Response:
        """One GET, retried once after a refused connection or a 5xx (a restarting Label Studio, a busy
        proxy); a time-out is not retried, since waiting twice as long helps nobody."""
        host = host_of(url)
        public_only = self._public_only(url)
        for attempt in (1, 2):
            try:
                headers = {**conditional, **(self.auth.header() if to_label_studio else {})}
                response = _get_streamed(url, headers, self.timeout, public_only)
                if response.status_code == 401 and to_label_studio and self.auth.is_personal_access_token:
                    response.close()  # the access token may have expired early: refresh once and retry
                    headers = {**conditional, **self.auth.header(force_refresh=True)}
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
        host = host_of(response.url)
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
        """Image bytes -> HxWx3 uint8 RGB, EXIF orientation applied.

        Its pixels are taken from the decode budget before decoding and given back when the returned array
        is freed (after the encoder has read it): large decodes wait for each other instead of adding up."""
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
        taken = self.decode_budget.acquire(width * height)
        try:
            rgb = to_rgb(ImageOps.exif_transpose(image))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            self.decode_budget.release(taken)
            raise ImageUnavailableError(f"the image could not be decoded: {error}") from None
        except BaseException:
            self.decode_budget.release(taken)
            raise
        self.decode_budget.release_when_freed(rgb, taken)
        return rgb

    def load(self, image: ImageVersion | ImageRef) -> np.ndarray:
        """The RGB pixels of a content (or of what is at a place now)."""
        if isinstance(image, ImageRef):
            image = self.current(image)
        return self.decode(self.bytes_of(image))


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
