"""Make sure the SegNext ONNX weights are on disk before the model is loaded.

The weights are published as a zip archive (a darktable ``.dtmodel`` file)
that holds ``encoder.onnx`` and ``decoder.onnx`` inside a folder.
:func:`ensure_model_files` downloads that archive once, checks its SHA-256,
and extracts just those two files into the model directory.

This module deliberately knows nothing about Flask, Label Studio or
environment variables: the caller decides the directory, URL and digest and
passes them in, which keeps the module easy to test and reuse.

Every write goes to a temporary file in the model directory first and is
then renamed into place with :func:`os.replace`. A rename within one
directory is atomic, so a download that is killed halfway never leaves a
truncated ``encoder.onnx`` behind that a later start would mistake for a
good one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Iterator, TypeVar

import requests
from tqdm import tqdm

# Only the URL is needed here, for the message shown when downloading is
# disabled; settings.py is the single place the default is written down.
from .settings import DEFAULT_MODEL_URL

logger = logging.getLogger(__name__)

# The two files the backend needs, in the order the model loads them.
MODEL_FILE_NAMES = ("encoder.onnx", "decoder.onnx")

# Read and hash in 1 MiB pieces: large enough to be fast, small enough that a
# multi-hundred-megabyte model never has to fit in memory at once.
_CHUNK_SIZE = 1024 * 1024

# Temporary files end in ".partial" so a leftover from a killed process is
# recognisable at a glance; the leading dot keeps them out of plain `ls`.
_PARTIAL_SUFFIX = ".partial"

# An ONNX file without external data is one protobuf message, which cannot
# exceed 2 GiB: a member that declares more is not a model file (a zip bomb,
# say), and is refused before anything is written.
MAX_MODEL_FILE_BYTES = 2 * 1024**3

# Room left on the model folder's disk after the model files are written.
_FREE_SPACE_MARGIN = 16 * 1024 * 1024

# The errors of a full disk (or a full quota): the download may be tried
# again once there is room, so they are download errors, retried, not a
# reason to exit (which a supervisor would answer with a restart and the
# same download, in a loop).
_NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ModelFilesError(RuntimeError):
    """The model files are missing and could not be fetched.

    The message is meant for a human: it says what went wrong and what to do.
    """


class ModelDownloadError(ModelFilesError):
    """The download itself failed (network, HTTP status, a corrupt or wrong-digest file): trying again later may
    work, unlike a setting or a folder that must be changed first."""


def missing_model_files(model_dir: Path) -> list[str]:
    """Return the names from MODEL_FILE_NAMES that are not in ``model_dir``."""
    model_dir = Path(model_dir)
    return [name for name in MODEL_FILE_NAMES if not (model_dir / name).is_file()]


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file, reading it in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK_SIZE), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_model_files(
    model_dir: Path,
    url: str,
    sha256: str | None,
    *,
    timeout: float = 30.0,
    progress: bool = True,
) -> None:
    """Make sure ``encoder.onnx`` and ``decoder.onnx`` exist in ``model_dir``.

    If both files are already there this returns at once without touching
    the network. Otherwise the zip at ``url`` is downloaded, checked against
    ``sha256`` (when given), and the two ONNX files are extracted.

    ``url=""`` disables downloading. ``timeout`` is the connect timeout and
    also the longest wait for the next piece of data while downloading.

    Raises ModelFilesError, with instructions for the user, on any failure.
    """
    model_dir = Path(model_dir)
    missing = missing_model_files(model_dir)
    if not missing:
        return

    if not url:
        raise ModelFilesError(
            f"SegNext model files missing in {model_dir}: {', '.join(missing)}. "
            "Automatic download is disabled (MODEL_URL is empty). "
            f"{_manual_install_hint(DEFAULT_MODEL_URL, model_dir)}"
        )

    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        zip_path = _new_partial_file(model_dir, prefix=".download-")
    except OSError as exc:
        if exc.errno in _NO_ROOM_ERRNOS:
            raise _no_room_error(model_dir, url, exc) from exc
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise ModelFilesError(_not_writable_message(model_dir, missing, url, exc)) from exc
    try:
        actual_sha256 = _download(url, zip_path, model_dir, timeout=timeout, progress=progress)
        if sha256 and actual_sha256 != sha256.strip().lower():
            raise ModelDownloadError(
                f"The file downloaded from {url} has the wrong SHA-256: "
                f"expected {sha256.strip().lower()}, got {actual_sha256}. "
                "The download may be corrupted or the file changed upstream; "
                "try again, or "
                f"{_manual_install_hint(url, model_dir, capitalize=False)}"
            )
        _extract_model_files(zip_path, model_dir, url)
    finally:
        # The zip is only a vehicle for the two ONNX files; never keep it,
        # whether we succeeded or failed.
        zip_path.unlink(missing_ok=True)


def _not_writable_message(model_dir: Path, missing: list[str], url: str, exc: OSError) -> str:
    """Who needs write access to the model folder (e.g. a root-owned Docker bind mount), and the alternative."""
    uid, gid = getattr(os, "getuid", lambda: "?")(), getattr(os, "getgid", lambda: "?")()
    return (
        f"Cannot download the SegNext model files into {model_dir}: {exc.strerror or exc}. "
        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing, and this process "
        f"(uid {uid}, gid {gid}) cannot write there. "
        f"Give uid {uid} write access to it (for a Docker bind mount: `chown -R {uid} <host folder>`), or put "
        "encoder.onnx and decoder.onnx there yourself: read-only files are fine once both are present. "
        f"{_manual_install_hint(url, model_dir)}"
    )


T = TypeVar("T")


def retry_failed_downloads(
    fetch: Callable[[], T],
    *,
    first_delay: float,
    max_delay: float,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fetch`` until it does not raise ModelDownloadError, waiting ``first_delay`` seconds after the
    first failure, twice as long after each further one, at most ``max_delay``; ``first_delay`` 0: no retry.

    A server whose first download fails would otherwise exit, be restarted by its supervisor (Docker's
    restart policy) and download the ~440 MB again at once, in a loop. Other errors (a folder that cannot be
    written, downloading disabled) are raised at once: only a person can fix them.
    """
    delay, attempt = first_delay, 1
    while True:
        try:
            return fetch()
        except ModelDownloadError as error:
            if first_delay <= 0:
                raise
            logger.error(
                "model download failed (attempt %d): %s Next attempt in %g s "
                "(MODEL_DOWNLOAD_RETRY_SECONDS, MODEL_DOWNLOAD_RETRY_MAX_SECONDS).",
                attempt, error, delay,
            )
        sleep(delay)
        delay, attempt = min(delay * 2, max(max_delay, first_delay)), attempt + 1


def _manual_install_hint(url: str, model_dir: Path, *, capitalize: bool = True) -> str:
    """The sentence that tells a user how to install the files by hand."""
    hint = (
        f"download {url}, unzip it and place encoder.onnx and decoder.onnx "
        f"in {model_dir} (or set MODEL_URL to a reachable mirror)."
    )
    return hint[0].upper() + hint[1:] if capitalize else hint


def _new_partial_file(model_dir: Path, prefix: str) -> Path:
    """Create an empty, uniquely named temporary file inside ``model_dir``.

    It lives in ``model_dir`` (not /tmp) so that the final os.replace stays
    on one filesystem and is therefore atomic. A unique name means two
    processes starting at the same time never write into each other's file;
    creating it exclusively (O_EXCL) means it is never a name someone planted
    beforehand, such as a symlink to a file that would be overwritten.
    """
    fd, name = tempfile.mkstemp(dir=model_dir, prefix=prefix, suffix=_PARTIAL_SUFFIX)
    os.close(fd)
    return Path(name)


@contextlib.contextmanager
def written_atomically(target: Path) -> Iterator[Path]:
    """Yield a new, uniquely named empty file beside ``target`` to write to;
    it replaces ``target`` when the block ends without an error, and is
    removed otherwise. A reader never sees half a file at ``target``.
    """
    partial = _new_partial_file(target.parent, prefix=f".{target.name}-")
    try:
        yield partial
        # mkstemp creates the file readable by its owner only; a model file
        # is read by whoever serves it (another user in a container, say).
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    finally:
        # After a successful os.replace the partial name no longer exists;
        # after a failure this removes the half-written file.
        partial.unlink(missing_ok=True)


def _download(url: str, dest: Path, model_dir: Path, *, timeout: float, progress: bool) -> str:
    """Stream ``url`` into ``dest`` and return the SHA-256 of what was written.

    Hashing while streaming avoids reading a large file a second time.
    """
    digest = hashlib.sha256()
    try:
        # (connect, read) timeouts: without them a stalled server would hang
        # the backend's start-up forever.
        with requests.get(url, stream=True, timeout=(timeout, timeout)) as response:
            response.raise_for_status()
            _check_room(model_dir, _content_length(response) or 0, f"the download from {url}", url)
            with open(dest, "wb") as out, tqdm(
                total=_content_length(response),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"Downloading {url.rsplit('/', 1)[-1]}",
                disable=not progress,
            ) as bar:
                for chunk in response.iter_content(chunk_size=_CHUNK_SIZE):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as exc:
        # Covers connection errors, timeouts, HTTP 4xx/5xx and bodies cut
        # short. (RequestException is an OSError: it must come first.)
        raise ModelDownloadError(
            f"Could not fetch the SegNext model from {url}: {exc}. "
            f"{_manual_install_hint(url, model_dir)}"
        ) from exc
    except OSError as exc:
        if exc.errno not in _NO_ROOM_ERRNOS:
            raise
        raise _no_room_error(model_dir, url, exc) from exc
    return digest.hexdigest()


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _check_room(model_dir: Path, needed: int, what: str, url: str) -> None:
    """Refuse, before writing, what would not fit on the model folder's disk."""
    free = _free_bytes(model_dir)
    if needed + _FREE_SPACE_MARGIN > free:
        raise ModelDownloadError(
            f"{what} needs {needed} bytes, but {model_dir} has {free} bytes free "
            f"(and {_FREE_SPACE_MARGIN} are kept free): make room there, or "
            f"{_manual_install_hint(url, model_dir, capitalize=False)}"
        )


def _no_room_error(model_dir: Path, url: str, exc: OSError) -> ModelDownloadError:
    return ModelDownloadError(
        f"The disk of {model_dir} is full ({exc.strerror or exc}) while installing "
        f"the SegNext model from {url}: nothing was installed; make room there, or "
        f"{_manual_install_hint(url, model_dir, capitalize=False)}"
    )


def _content_length(response: requests.Response) -> int | None:
    """Size announced by the server, or None (tqdm then shows no total)."""
    try:
        return int(response.headers["Content-Length"]) or None
    except (KeyError, ValueError):
        return None


def _extract_model_files(zip_path: Path, model_dir: Path, url: str) -> None:
    """Extract encoder.onnx and decoder.onnx from the archive into model_dir.

    Both files are always extracted, even if one was already present, so
    the pair on disk always comes from the same release.
    """
    try:
        with zipfile.ZipFile(zip_path) as archive:
            # Find and vet both members before writing anything, so a bad
            # archive is rejected without leaving half an install behind.
            members = _find_model_members(archive, url, model_dir)
            _check_member_sizes(members, model_dir, url)
            for name, member in members.items():
                _extract_member_atomically(archive, member, model_dir / name)
    except OSError as exc:
        if exc.errno not in _NO_ROOM_ERRNOS:
            raise
        raise _no_room_error(model_dir, url, exc) from exc
    except zipfile.BadZipFile as exc:
        # Typically an HTML error page or a proxy's login page served with
        # status 200 instead of the archive.
        raise ModelDownloadError(
            f"The file downloaded from {url} is not a valid zip archive ({exc}). "
            f"{_manual_install_hint(url, model_dir)}"
        ) from exc


def _find_model_members(
    archive: zipfile.ZipFile, url: str, model_dir: Path
) -> dict[str, zipfile.ZipInfo]:
    """Map each name in MODEL_FILE_NAMES to its member in the archive.

    Members are matched by file name alone, because the folder they sit in
    (e.g. ``mask-object-segnext-b2hq/``) differs between releases.
    """
    found: dict[str, zipfile.ZipInfo] = {}
    for member in archive.infolist():
        if member.is_dir():
            continue
        basename = PurePosixPath(member.filename.replace("\\", "/")).name
        if basename not in MODEL_FILE_NAMES:
            continue
        # We only ever write to model_dir/<basename>, but a member such as
        # "../encoder.onnx" means the archive is not what we expect; refuse
        # it rather than guess.
        if not _is_safe_member_path(member.filename):
            raise ModelFilesError(
                f"Refusing to extract {member.filename!r} from {url}: the path "
                "leaves the archive (absolute or contains '..'). "
                f"{_manual_install_hint(url, model_dir)}"
            )
        if basename in found:
            raise ModelFilesError(
                f"The archive from {url} contains {basename} more than once "
                f"({found[basename].filename!r} and {member.filename!r}); "
                "cannot tell which one to use. "
                f"{_manual_install_hint(url, model_dir)}"
            )
        found[basename] = member

    absent = [name for name in MODEL_FILE_NAMES if name not in found]
    if absent:
        raise ModelFilesError(
            f"The archive from {url} does not contain {' or '.join(absent)}; "
            "is MODEL_URL pointing at the right file? "
            f"{_manual_install_hint(url, model_dir)}"
        )
    return {name: found[name] for name in MODEL_FILE_NAMES}


def _check_member_sizes(members: dict[str, zipfile.ZipInfo], model_dir: Path, url: str) -> None:
    """Refuse members from the sizes the archive declares, before writing.

    zipfile never writes more than a member's declared (central directory)
    size: a member whose data inflates further fails its CRC check. So the
    declared sizes bound what extracting can write, whatever the data holds.
    """
    for name, member in members.items():
        if member.file_size > MAX_MODEL_FILE_BYTES:
            raise ModelDownloadError(
                f"The archive from {url} declares {name} as {member.file_size} bytes, "
                f"more than an ONNX model file can be ({MAX_MODEL_FILE_BYTES}): refused "
                f"before writing it. {_manual_install_hint(url, model_dir)}"
            )
    _check_room(model_dir, sum(m.file_size for m in members.values()), f"{' and '.join(members)} from {url}", url)


def _is_safe_member_path(member_name: str) -> bool:
    """False for absolute paths (POSIX or Windows) and paths with '..'."""
    posix = PurePosixPath(member_name.replace("\\", "/"))
    return (
        not posix.is_absolute()
        and ".." not in posix.parts
        and not PureWindowsPath(member_name).drive
    )


def _extract_member_atomically(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path
) -> None:
    """Write one member to ``target`` via a temporary file and os.replace."""
    with written_atomically(target) as partial:
        # zipfile checks the member's CRC when it is read to the end and
        # raises BadZipFile on mismatch, so a corrupt member never reaches
        # os.replace.
        with archive.open(member) as source, open(partial, "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK_SIZE)
