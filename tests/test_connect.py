"""Connecting to Label Studio: both kinds of token, every image source, and the key staying home.

A stand-in Label Studio on loopback checks tokens the way Label Studio 1.23 does: legacy tokens as
`Token <key>`, personal access tokens (JWT refresh tokens) exchanged at /api/token/refresh/ for 5-minute
access tokens sent as `Bearer <access>`.
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from segnext_backend.errors import RequestError
from segnext_backend import images
from segnext_backend.images import ImageFetchConfig, ImageRef, ImageSource
from tools.file_server import BytesHandler

LEGACY = "0123456789abcdef0123456789abcdef01234567"


def jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"eyJ{part({'alg': 'HS256'})[3:]}.{part(claims)}.signature"


PAT = jwt({"token_type": "refresh", "exp": time.time() + 3600})


class StandInLabelStudio:
    """Serves /data/upload/<name>, the token refresh and the presign endpoint; records every request."""

    def __init__(self, foreign_url: str = ""):
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.refreshes = 0
        self.access_lifetime = 300.0
        self.valid_access: dict[str, float] = {}
        self.foreign_url = foreign_url
        self.lock = threading.Lock()

    def authorised(self, header: str) -> bool:
        if header == f"Token {LEGACY}":
            return True
        if header.startswith("Bearer "):
            expires = self.valid_access.get(header[7:])
            return expires is not None and time.time() < expires
        return False

    def handler(self):
        ls = self

        class Handler(BytesHandler):

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/api/token/refresh/" and body.get("refresh") == PAT:
                    with ls.lock:
                        ls.refreshes += 1
                        access = jwt({"token_type": "access", "exp": time.time() + ls.access_lifetime, "n": ls.refreshes})
                        ls.valid_access[access] = time.time() + ls.access_lifetime
                    return self.reply(200, json.dumps({"access": access}).encode(), [("Content-Type", "application/json")])
                return self.reply(401)

            def do_GET(self):
                ls.requests.append({"path": self.path, "authorization": self.headers.get("Authorization")})
                if not ls.authorised(self.headers.get("Authorization", "")):
                    return self.reply(401, b'{"detail": "Authentication credentials were not provided."}')
                parts = urlsplit(self.path)
                if parts.path.startswith("/tasks/") and parts.path.endswith("/presign/"):
                    uri = base64.urlsafe_b64decode(parse_qs(parts.query)["fileuri"][0]).decode()
                    name = uri.rsplit("/", 1)[-1]
                    return self.reply(303, headers=[("Location", f"{ls.foreign_url}/signed/{name}?sig=abc")])
                if parts.path == "/data/upload/1/redirected.png":
                    return self.reply(302, headers=[("Location", f"{ls.foreign_url}/elsewhere.png")])
                content = ls.files.get(parts.path)
                return self.reply(200, content) if content is not None else self.reply(404)

        return Handler


@pytest.fixture
def servers(image_server):
    """(stand-in Label Studio URL and state, a foreign image host under another name)."""
    foreign = image_server  # 127.0.0.1; addressed as "localhost" so that it is another host
    foreign_url = foreign.url.replace("127.0.0.1", "localhost")
    ls = StandInLabelStudio(foreign_url)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ls.handler())
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    ls.url = f"http://127.0.0.1:{httpd.server_port}"
    yield ls, foreign
    httpd.shutdown()
    httpd.server_close()


def source_for(ls, key: str, **overrides) -> ImageSource:
    return ImageSource(ImageFetchConfig(label_studio_url=ls.url, label_studio_api_key=key, **overrides))


@pytest.mark.parametrize("key", [LEGACY, PAT], ids=["legacy token", "personal access token"])
def test_both_token_kinds_fetch_an_upload(servers, key):
    ls, _ = servers
    ls.files["/data/upload/1/a.png"] = b"image bytes"
    source = source_for(ls, key)
    assert source.fetch(source.locate("/data/upload/1/a.png")) == b"image bytes"
    expected = "Token " if key == LEGACY else "Bearer "
    assert ls.requests[-1]["authorization"].startswith(expected)
    assert ls.refreshes == (1 if key == PAT else 0)


def test_access_token_is_refreshed_after_expiry_and_on_401(servers):
    ls, _ = servers
    for name in "abc":
        ls.files[f"/data/upload/1/{name}.png"] = name.encode()
    ls.access_lifetime = 1.0  # expires within the refresh margin: refreshed before every request
    source = source_for(ls, PAT, download_cache_bytes=0)
    source.fetch(source.locate("/data/upload/1/a.png"))
    source.fetch(source.locate("/data/upload/1/b.png"))
    assert ls.refreshes == 2

    ls.access_lifetime = 300.0
    source.fetch(source.locate("/data/upload/1/a.png"))
    refreshed = ls.refreshes
    ls.valid_access.clear()  # Label Studio forgets the token early (a restart, say): 401, refresh, retry
    assert source.fetch(source.locate("/data/upload/1/c.png")) == b"c"
    assert ls.refreshes == refreshed + 1


def test_a_refused_personal_access_token_is_named(servers):
    ls, _ = servers
    bad = jwt({"token_type": "refresh", "exp": 0})
    source = source_for(ls, bad)
    with pytest.raises(Exception, match="refused the personal access token.*LABEL_STUDIO_API_KEY"):
        source.fetch(source.locate("/data/upload/1/a.png"))


def test_the_key_never_reaches_another_host_even_through_a_redirect(servers):
    ls, foreign = servers
    foreign.add("/elsewhere.png", b"foreign bytes")
    source = source_for(ls, LEGACY, allow_private_hosts=True)  # the foreign host is on loopback here
    assert source.fetch(source.locate("/data/upload/1/redirected.png")) == b"foreign bytes"
    (request,) = foreign.requests_for("/elsewhere.png")
    assert "Authorization" not in request["headers"]
    direct = source.locate(foreign.url.replace("127.0.0.1", "localhost") + "/elsewhere.png")
    source.fetch(direct)
    assert all("Authorization" not in r["headers"] for r in foreign.requests)


def test_a_redirect_towards_a_private_address_is_refused(servers):
    ls, foreign = servers
    foreign.add("/elsewhere.png", b"foreign bytes")
    source = source_for(ls, LEGACY)  # private hosts not allowed: Label Studio itself still is
    with pytest.raises(RequestError, match="non-public address"):
        source.fetch(source.locate("/data/upload/1/redirected.png"))
    assert foreign.requests == []


def test_a_presigned_cloud_uri_is_fetched(servers):
    ls, foreign = servers
    foreign.add("/signed/photo.jpg?sig=abc", b"cloud bytes")
    source = source_for(ls, PAT, allow_private_hosts=True)
    ref = source.locate("s3://bucket/dir/photo.jpg", task_id=42)
    assert source.fetch(ref) == b"cloud bytes"
    presign = [r for r in ls.requests if r["path"].startswith("/tasks/42/presign/")]
    assert presign and presign[0]["authorization"].startswith("Bearer ")
    assert "Authorization" not in foreign.requests_for("/signed/photo.jpg?sig=abc")[0]["headers"]
    # Another task is another place (its project's storages resolve the URI), but the same bytes there are
    # the same image: one content key, so one set of features.
    other_task = source.locate("s3://bucket/dir/photo.jpg", task_id=43)
    assert other_task != ref and source.current(other_task) == source.current(ref)


def test_local_files_are_read_under_the_document_root_only(servers, tmp_path):
    ls, _ = servers
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "a b.png").write_bytes(b"local bytes")
    (tmp_path / "secret.txt").write_bytes(b"secret")
    (root / "images" / "link.png").symlink_to(tmp_path / "secret.txt")
    source = source_for(ls, LEGACY, local_files_document_root=str(root))
    ref = source.locate("/data/local-files/?d=images/a%20b.png")
    assert ref.kind == "local" and source.fetch(ref) == b"local bytes"
    assert not ls.requests  # read from disk, not through Label Studio
    for path in ("../secret.txt", "images/../../secret.txt", "%2e%2e/secret.txt", "%2E%2E%2Fsecret.txt",
                 "/etc/passwd", "%2Fetc%2Fpasswd", "images/link.png", ""):
        with pytest.raises(RequestError):
            source.locate(f"/data/local-files/?d={path}")


def test_local_files_go_through_label_studio_without_a_document_root(servers):
    ls, _ = servers
    source = source_for(ls, LEGACY)
    assert source.locate("/data/local-files/?d=images/a.png").kind == "url"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2/x.png",
        "http://localhost/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/x.png",
        "http://192.168.1.1/x.png",
        "http://172.16.0.1/x.png",
        "http://[::1]/x.png",
        "http://0.0.0.0/x.png",
    ],
)
def test_urls_on_non_public_addresses_are_refused_by_default(servers, url):
    ls, _ = servers
    source = source_for(ls, LEGACY)
    with pytest.raises(RequestError, match="non-public address.*ALLOW_PRIVATE_IMAGE_HOSTS"):
        source.fetch(source.locate(url))


def _rebinding_dns(monkeypatch, name: str, first_answer: str, later_answer: str) -> list:
    """`name` resolves to first_answer once (the backend's check), then to later_answer (the connection)."""
    real_getaddrinfo = socket.getaddrinfo
    lookups = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host != name:
            return real_getaddrinfo(host, port, *args, **kwargs)
        lookups.append(host)
        address = first_answer if len(lookups) == 1 else later_answer
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 80)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return lookups


def test_a_name_rebound_to_a_private_address_after_the_check_is_refused_before_sending(servers, monkeypatch):
    ls, foreign = servers
    foreign.add("/x.png", b"foreign bytes")
    lookups = _rebinding_dns(monkeypatch, "rebind.example", "93.184.216.34", "127.0.0.1")
    source = source_for(ls, LEGACY)
    port = urlsplit(foreign.url).port
    with pytest.raises(RequestError, match=r"rebind.example is on a non-public address \(127.0.0.1\)"):
        source.fetch(source.locate(f"http://rebind.example:{port}/x.png"))
    assert len(lookups) == 2  # the check passed on the public answer; the connection saw loopback
    assert foreign.requests == []  # refused once connected, before the request was sent


def test_connections_checked_for_public_addresses_still_fetch(servers, monkeypatch):
    ls, foreign = servers
    foreign.add("/x.png", b"foreign bytes")
    _rebinding_dns(monkeypatch, "images.example", "93.184.216.34", "127.0.0.1")
    checked = []
    monkeypatch.setattr(images, "is_public", lambda address: checked.append(address) or True)  # all allowed
    source = source_for(ls, LEGACY)
    port = urlsplit(foreign.url).port
    assert source.fetch(source.locate(f"http://images.example:{port}/x.png")) == b"foreign bytes"
    assert checked == ["93.184.216.34", "127.0.0.1"]  # the name, then the address the socket reached


def test_downloads_are_cached_within_their_byte_budget(servers):
    ls, _ = servers
    ls.files["/data/upload/1/a.png"] = b"x" * 100
    ls.files["/data/upload/1/b.png"] = b"y" * 100
    source = source_for(ls, LEGACY, download_cache_bytes=150)
    a, b = source.locate("/data/upload/1/a.png"), source.locate("/data/upload/1/b.png")
    source.fetch(a)
    source.fetch(a)
    assert len(ls.requests) == 1
    source.fetch(b)  # evicts a
    source.fetch(a)
    assert len(ls.requests) == 3 and source.downloads.stats().bytes <= 150


def test_image_ref_identity():
    assert ImageRef("cloud", "s3://b/k", 1) != ImageRef("cloud", "s3://b/k", 2)
    assert ImageRef("url", "s3://b/k") != ImageRef("cloud", "s3://b/k")
