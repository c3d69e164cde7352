"""Tests for segnext_backend.model_files against a local HTTP server.

Nothing here touches the internet: each test builds a small zip shaped like
the real ``mask-object-segnext-b2hq.dtmodel`` (fake bytes instead of ONNX
graphs) and serves it from a ThreadingHTTPServer on 127.0.0.1.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import time
import zipfile
from pathlib import Path

import pytest

from segnext_backend import model_files
from segnext_backend.model_files import (
    MODEL_FILE_NAMES,
    ModelDownloadError,
    ModelFilesError,
    ensure_model_files,
    file_sha256,
    missing_model_files,
    retry_failed_downloads,
)
from tools.file_server import BytesHandler, free_port, start_server

ENCODER_BYTES = b"fake encoder weights " * 1000
DECODER_BYTES = b"fake decoder weights " * 500
PREFIX = "mask-object-segnext-b2hq/"
MANUAL_HINT = "place encoder.onnx and decoder.onnx in"


def make_zip(members: dict[str, bytes]) -> bytes:
    """A zip archive holding ``members`` (name -> content), as bytes.

    writestr keeps names exactly as given, so '../x' stays '../x' and the
    traversal tests really exercise hostile member names.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{PREFIX}config.json", b"{}")
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


GOOD_ZIP = make_zip({f"{PREFIX}encoder.onnx": ENCODER_BYTES, f"{PREFIX}decoder.onnx": DECODER_BYTES})
GOOD_SHA256 = hashlib.sha256(GOOD_ZIP).hexdigest()


class FileServer:
    """Serves ``files`` (URL path -> bytes) and counts every request it gets.

    Unknown paths get 404; the path ``/slow`` answers with headers, then
    stalls, to trigger a read timeout.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.request_count = 0
        served = self

        class Handler(BytesHandler):
            def do_GET(self) -> None:
                served.request_count += 1
                if self.path == "/slow":
                    self._stall()
                    return
                self.answer(served.files.get(self.path))

            def _stall(self) -> None:
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    time.sleep(1.0)
                except OSError:
                    pass  # the client gave up first, which is the point

        self.base_url, self._server = start_server(Handler)

    def url(self, path: str) -> str:
        return self.base_url + path

    def serve(self, path: str, body: bytes) -> str:
        """Publish ``body`` at ``path`` and return its full URL."""
        self.files[path] = body
        return self.url(path)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def server():
    file_server = FileServer()
    yield file_server
    file_server.close()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    # A subdirectory, so tests can check that nothing escapes into tmp_path.
    return tmp_path / "models"


def dir_listing(path: Path) -> list[str]:
    """Every entry under ``path`` (hidden temp files included), sorted."""
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_download_installs_both_files_and_leaves_nothing_else(server, model_dir):
    url = server.serve("/model.dtmodel", GOOD_ZIP)

    # progress=True exercises the tqdm path (Content-Length is sent).
    ensure_model_files(model_dir, url, GOOD_SHA256, timeout=5, progress=True)

    assert (model_dir / "encoder.onnx").read_bytes() == ENCODER_BYTES
    assert (model_dir / "decoder.onnx").read_bytes() == DECODER_BYTES
    # No zip, no .partial files, no config.json.
    assert dir_listing(model_dir) == ["decoder.onnx", "encoder.onnx"]
    assert missing_model_files(model_dir) == []


def test_download_without_digest_check(server, model_dir):
    url = server.serve("/model.dtmodel", GOOD_ZIP)

    ensure_model_files(model_dir, url, None, timeout=5, progress=False)

    assert dir_listing(model_dir) == ["decoder.onnx", "encoder.onnx"]


def test_wrong_digest_is_rejected_and_nothing_is_installed(server, model_dir):
    url = server.serve("/model.dtmodel", GOOD_ZIP)
    expected = "0" * 64

    with pytest.raises(ModelFilesError) as error:
        ensure_model_files(model_dir, url, expected, timeout=5, progress=False)

    message = str(error.value)
    assert expected in message
    assert GOOD_SHA256 in message
    assert dir_listing(model_dir) == []


def test_http_404_explains_manual_install(server, model_dir):
    url = server.url("/no-such-file.dtmodel")

    with pytest.raises(ModelFilesError) as error:
        ensure_model_files(model_dir, url, GOOD_SHA256, timeout=5, progress=False)

    message = str(error.value)
    assert "Could not fetch" in message
    assert url in message
    assert f"{MANUAL_HINT} {model_dir}" in message
    assert dir_listing(model_dir) == []


def test_unreachable_server_fails_fast_with_manual_install_hint(model_dir):
    url = f"http://127.0.0.1:{free_port()}/model.dtmodel"  # nothing listens there

    started = time.monotonic()
    with pytest.raises(ModelFilesError) as error:
        ensure_model_files(model_dir, url, GOOD_SHA256, timeout=2, progress=False)

    assert time.monotonic() - started < 2
    assert MANUAL_HINT in str(error.value)
    assert dir_listing(model_dir) == []


def test_stalled_server_times_out(server, model_dir):
    started = time.monotonic()
    with pytest.raises(ModelFilesError) as error:
        ensure_model_files(model_dir, server.url("/slow"), None, timeout=0.2, progress=False)

    assert time.monotonic() - started < 1
    assert MANUAL_HINT in str(error.value)
    assert dir_listing(model_dir) == []


def test_archive_without_decoder_is_rejected(server, model_dir):
    url = server.serve("/model.dtmodel", make_zip({f"{PREFIX}encoder.onnx": ENCODER_BYTES}))

    with pytest.raises(ModelFilesError, match="decoder.onnx"):
        ensure_model_files(model_dir, url, None, timeout=5, progress=False)

    # The encoder is not installed on its own either.
    assert dir_listing(model_dir) == []


def test_not_a_zip_is_rejected(server, model_dir):
    url = server.serve("/model.dtmodel", b"<html>Please log in</html>")

    with pytest.raises(ModelFilesError, match="not a valid zip"):
        ensure_model_files(model_dir, url, None, timeout=5, progress=False)

    assert dir_listing(model_dir) == []


@pytest.mark.parametrize(
    "hostile_name",
    ["../encoder.onnx", f"{PREFIX}../../encoder.onnx", "/tmp/encoder.onnx"],
)
def test_member_path_escaping_the_archive_is_refused(server, model_dir, tmp_path, hostile_name):
    url = server.serve(
        "/model.dtmodel",
        make_zip({hostile_name: b"evil", f"{PREFIX}decoder.onnx": DECODER_BYTES}),
    )

    with pytest.raises(ModelFilesError, match="Refusing to extract"):
        ensure_model_files(model_dir, url, None, timeout=5, progress=False)

    assert dir_listing(model_dir) == []
    assert dir_listing(tmp_path) == ["models"]


def test_unrelated_hostile_member_is_never_extracted(server, model_dir, tmp_path):
    url = server.serve(
        "/model.dtmodel",
        make_zip(
            {
                "../evil.txt": b"evil",
                f"{PREFIX}encoder.onnx": ENCODER_BYTES,
                f"{PREFIX}decoder.onnx": DECODER_BYTES,
            }
        ),
    )

    ensure_model_files(model_dir, url, None, timeout=5, progress=False)

    assert dir_listing(model_dir) == ["decoder.onnx", "encoder.onnx"]
    assert dir_listing(tmp_path) == ["models"]


def test_existing_files_mean_no_request(server, model_dir):
    model_dir.mkdir()
    for name in MODEL_FILE_NAMES:
        (model_dir / name).write_bytes(b"already here")
    url = server.serve("/model.dtmodel", GOOD_ZIP)

    ensure_model_files(model_dir, url, GOOD_SHA256, timeout=5, progress=False)

    assert server.request_count == 0
    assert (model_dir / "encoder.onnx").read_bytes() == b"already here"


def test_one_missing_file_triggers_download_of_the_pair(server, model_dir):
    model_dir.mkdir()
    (model_dir / "encoder.onnx").write_bytes(b"stale")
    url = server.serve("/model.dtmodel", GOOD_ZIP)

    assert missing_model_files(model_dir) == ["decoder.onnx"]
    ensure_model_files(model_dir, url, GOOD_SHA256, timeout=5, progress=False)

    assert server.request_count == 1
    # Both come from the same archive, so the pair always matches.
    assert (model_dir / "encoder.onnx").read_bytes() == ENCODER_BYTES
    assert (model_dir / "decoder.onnx").read_bytes() == DECODER_BYTES


def test_empty_url_disables_download_and_says_where_files_go(model_dir):
    with pytest.raises(ModelFilesError) as error:
        ensure_model_files(model_dir, "", GOOD_SHA256, progress=False)

    assert f"{MANUAL_HINT} {model_dir}" in str(error.value)
    assert not model_dir.exists()


def test_missing_model_files_on_absent_directory(model_dir):
    assert missing_model_files(model_dir) == list(MODEL_FILE_NAMES)


def test_file_sha256_matches_hashlib(tmp_path):
    # A little over 2 MiB, so more than one 1 MiB chunk is read.
    content = bytes(range(256)) * (9 * 1024)
    path = tmp_path / "blob.bin"
    path.write_bytes(content)

    assert file_sha256(path) == hashlib.sha256(content).hexdigest()


# -- a model folder the process cannot write (a root-owned Docker bind mount; the image runs as uid 1000) ------


def _assert_names_the_uid(message: str, model_dir: Path) -> None:
    assert f"Cannot download the SegNext model files into {model_dir}" in message
    assert f"(uid {os.getuid()}, gid {os.getgid()})" in message and f"chown -R {os.getuid()}" in message
    assert "read-only files are fine once both are present" in message


@pytest.mark.parametrize("error", [errno.EACCES, errno.EROFS])  # a folder owned by another user; a :ro mount
def test_an_unwritable_folder_names_the_uid_before_any_request(server, model_dir, monkeypatch, error):
    model_dir.mkdir()

    def refused(*args, **kwargs):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(model_files.tempfile, "mkstemp", refused)
    url = server.serve("/model.dtmodel", GOOD_ZIP)
    with pytest.raises(ModelFilesError) as raised:
        ensure_model_files(model_dir, url, GOOD_SHA256, timeout=5, progress=False)
    _assert_names_the_uid(str(raised.value), model_dir)
    assert not isinstance(raised.value, ModelDownloadError)  # not retried: only a person can fix it
    assert server.request_count == 0


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into any folder")
def test_a_real_read_only_folder_names_the_uid(server, model_dir):
    model_dir.mkdir()
    model_dir.chmod(0o555)
    try:
        with pytest.raises(ModelFilesError) as raised:
            ensure_model_files(model_dir, server.serve("/model.dtmodel", GOOD_ZIP), GOOD_SHA256, progress=False)
        _assert_names_the_uid(str(raised.value), model_dir)
        # Both files placed by hand: a read-only folder is fine.
        model_dir.chmod(0o755)
        for name in MODEL_FILE_NAMES:
            (model_dir / name).write_bytes(b"placed by hand")
        model_dir.chmod(0o555)
        ensure_model_files(model_dir, server.url("/model.dtmodel"), GOOD_SHA256, progress=False)
    finally:
        model_dir.chmod(0o755)


# -- a first download that keeps failing is retried with a growing delay -----------------------------------------


def test_failed_downloads_are_retried_with_a_doubling_delay_up_to_the_maximum(server, model_dir, caplog):
    url = server.url("/model.dtmodel")  # 404 until it is published
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        if len(waits) == 5:
            server.serve("/model.dtmodel", GOOD_ZIP)

    fetch = lambda: ensure_model_files(model_dir, url, GOOD_SHA256, timeout=5, progress=False)  # noqa: E731
    retry_failed_downloads(fetch, first_delay=10, max_delay=50, sleep=sleep)

    assert waits == [10, 20, 40, 50, 50]
    assert server.request_count == 6
    assert (model_dir / "encoder.onnx").read_bytes() == ENCODER_BYTES
    assert "model download failed (attempt 5)" in caplog.text and "Next attempt in 50 s" in caplog.text


@pytest.mark.parametrize("body", [b"<html>a proxy's login page</html>", None])  # not a zip; HTTP 404
def test_every_kind_of_download_failure_is_retried(server, model_dir, body):
    url = server.serve("/model.dtmodel", body) if body else server.url("/model.dtmodel")

    class Enough(Exception):
        pass

    def sleep(seconds):
        if server.request_count == 2:
            raise Enough

    with pytest.raises(Enough):
        retry_failed_downloads(
            lambda: ensure_model_files(model_dir, url, None, timeout=5, progress=False), first_delay=1, max_delay=1, sleep=sleep
        )


def test_errors_a_person_must_fix_and_retry_off_are_raised_at_once(server, model_dir):
    def no_sleep(seconds):
        raise AssertionError("retried")

    with pytest.raises(ModelFilesError, match="MODEL_URL is empty"):  # downloading disabled
        retry_failed_downloads(lambda: ensure_model_files(model_dir, "", None), first_delay=1, max_delay=1, sleep=no_sleep)
    url = server.url("/model.dtmodel")
    with pytest.raises(ModelDownloadError):  # MODEL_DOWNLOAD_RETRY_SECONDS=0
        retry_failed_downloads(
            lambda: ensure_model_files(model_dir, url, None, timeout=5, progress=False), first_delay=0, max_delay=1, sleep=no_sleep
        )
    assert server.request_count == 1


# -- an archive that would fill the disk, and a disk that fills up ---------------------------------------------


def zip_declaring(members: dict[str, bytes], declared: dict[str, int]) -> bytes:
    """A zip archive whose central directory declares other uncompressed sizes for some members."""
    import struct

    data = bytearray(make_zip(members))
    position = 0
    while (position := data.find(b"PK\x01\x02", position)) >= 0:
        name_length = struct.unpack_from("<H", data, position + 28)[0]
        name = data[position + 46 : position + 46 + name_length].decode()
        if name in declared:
            struct.pack_into("<I", data, position + 24, declared[name])
        position += 46
    return bytes(data)


def test_an_archive_declaring_more_than_the_free_space_is_refused_before_writing(server, model_dir, monkeypatch):
    # 464 bytes of download, 40 MB of zeros once inflated: the disk (here: 30 MB free) is never filled.
    bomb = make_zip({f"{PREFIX}encoder.onnx": bytes(40_000_000), f"{PREFIX}decoder.onnx": b"d"})
    url = server.serve("/bomb.dtmodel", bomb)
    written = []
    real_copy = model_files.shutil.copyfileobj
    monkeypatch.setattr(model_files, "_free_bytes", lambda folder: 30_000_000)
    monkeypatch.setattr(model_files.shutil, "copyfileobj", lambda *a: written.append(a[1].name) or real_copy(*a))
    with pytest.raises(ModelDownloadError, match=r"needs 40000001 bytes, but .* has 30000000 bytes free"):
        ensure_model_files(model_dir, url, None, progress=False)
    assert written == [] and dir_listing(model_dir) == []


def test_a_member_declaring_more_than_an_onnx_file_can_hold_is_refused(server, model_dir):
    encoder = f"{PREFIX}encoder.onnx"
    url = server.serve("/big.dtmodel", zip_declaring({encoder: ENCODER_BYTES, f"{PREFIX}decoder.onnx": DECODER_BYTES},
                                                       {encoder: model_files.MAX_MODEL_FILE_BYTES + 1}))
    with pytest.raises(ModelDownloadError, match="declares encoder.onnx as 2147483649 bytes"):
        ensure_model_files(model_dir, url, None, progress=False)
    assert dir_listing(model_dir) == []


def test_a_member_inflating_past_its_declared_size_writes_no_more_than_declared(server, model_dir):
    # What bounds the writing is the declared size: zipfile stops there (and the CRC then fails).
    encoder = f"{PREFIX}encoder.onnx"
    liar = zip_declaring({encoder: bytes(5_000_000), f"{PREFIX}decoder.onnx": DECODER_BYTES}, {encoder: 1000})
    url = server.serve("/liar.dtmodel", liar)
    with pytest.raises(ModelDownloadError, match="not a valid zip archive"):
        ensure_model_files(model_dir, url, None, progress=False)
    assert dir_listing(model_dir) == []


def test_a_download_larger_than_the_free_space_is_refused_before_writing(server, model_dir, monkeypatch):
    url = server.serve("/model.dtmodel", GOOD_ZIP)
    monkeypatch.setattr(model_files, "_free_bytes", lambda folder: 1000)
    with pytest.raises(ModelDownloadError, match=f"the download from {url} needs {len(GOOD_ZIP)} bytes"):
        ensure_model_files(model_dir, url, None, progress=False)
    assert dir_listing(model_dir) == []


@pytest.mark.parametrize("full_at", [1, 2], ids=["download", "extract"])
def test_a_full_disk_is_a_download_error_retried_later_with_nothing_left_behind(server, model_dir, monkeypatch,
                                                                                 full_at):
    # gunicorn's master retries download errors (gunicorn.conf.py) and exits on anything else, which Docker's
    # restart policy answers with a new process and the same download, in a loop.
    url = server.serve("/model.dtmodel", GOOD_ZIP)
    opened = []

    class FullDisk(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_on_a_disk_that_fills(path, mode="r", *args, **kwargs):
        opened.append(mode)
        if mode == "wb" and opened.count("wb") == full_at:  # the download's file, then the first member's
            return FullDisk(path, "wb")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(model_files, "open", open_on_a_disk_that_fills, raising=False)
    waits = []
    retry_failed_downloads(lambda: ensure_model_files(model_dir, url, GOOD_SHA256, progress=False),
                           first_delay=1, max_delay=1, sleep=lambda s: waits.append(dir_listing(model_dir)))
    assert waits == [[]]  # one retry, with nothing left behind by the failed attempt
    assert (model_dir / "encoder.onnx").read_bytes() == ENCODER_BYTES
    assert (model_dir / "decoder.onnx").read_bytes() == DECODER_BYTES


def test_installed_files_are_readable_by_others(server, model_dir):
    ensure_model_files(model_dir, server.serve("/model.dtmodel", GOOD_ZIP), GOOD_SHA256, progress=False)
    assert all((model_dir / name).stat().st_mode & 0o777 == 0o644 for name in MODEL_FILE_NAMES)
