"""A slow name server cannot stretch a download past IMAGE_DOWNLOAD_TIMEOUT: the system resolver's own time-outs
(seconds per name server, per search domain, per attempt) are outside the deadline's reach otherwise, since a
lookup has no socket that the deadline could shut."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from segnext_backend.errors import ImageUnavailableError
from segnext_backend.images import ImageFetchConfig, ImageSource

SLOW_NAME = "slow-name-server.example"
RESOLVER_SECONDS = 20.0


@pytest.fixture
def slow_name_server(monkeypatch):
    """getaddrinfo answers SLOW_NAME only after RESOLVER_SECONDS (then: no such name), others as usual."""
    real = socket.getaddrinfo
    lookups = []
    released = threading.Event()

    def getaddrinfo(host, *args, **kwargs):
        if host == SLOW_NAME:
            lookups.append(host)
            released.wait(RESOLVER_SECONDS)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield lookups
    released.set()


@pytest.mark.parametrize("allow_private_hosts", [False, True], ids=["name-checked-first", "urllib3-lookup-only"])
def test_a_slow_name_lookup_ends_at_the_download_deadline(slow_name_server, allow_private_hosts):
    # allow_private_hosts skips the backend's own address check, leaving urllib3's lookup in the connection.
    source = ImageSource(ImageFetchConfig(download_timeout=1.5, allow_private_hosts=allow_private_hosts))
    started = time.monotonic()
    with pytest.raises(ImageUnavailableError, match="IMAGE_DOWNLOAD_TIMEOUT"):
        source.fetch(source.locate(f"http://{SLOW_NAME}/image.png"))
    elapsed = time.monotonic() - started
    assert slow_name_server, "the slow name was never looked up"
    assert elapsed < RESOLVER_SECONDS / 2, f"the download took {elapsed:.1f} s with a deadline of 1.5 s"
