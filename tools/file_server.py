"""A throwaway HTTP server on 127.0.0.1 that serves byte strings by path: Label Studio's stand-in for the
benchmark and the load test. The tests' image server is built on the same handler."""

from __future__ import annotations

import http.server
import socket
import threading


class BytesHandler(http.server.BaseHTTPRequestHandler):
    """A quiet request handler; subclasses' do_GET calls `answer` (or `reply`) with what to send back."""

    def reply(self, status: int, body: bytes = b"", headers=()) -> None:
        """Send `status` with `body` and these (name, value) headers."""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def answer(self, content: bytes | int | None) -> None:
        """Send `content` with 200; an int is answered as that status without a body, None as 404."""
        if content is None or isinstance(content, int):
            self.send_response(content or 404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, *args):
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free when this returns; taken by whoever binds first)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(handler: type[http.server.BaseHTTPRequestHandler]) -> tuple[str, http.server.ThreadingHTTPServer]:
    """Serve with `handler` on a free port of 127.0.0.1 from a daemon thread; returns (base URL, server)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_port}", httpd


def serve_files(files: dict[str, bytes]) -> tuple[str, http.server.ThreadingHTTPServer]:
    """Start serving `files` (path -> bytes; the query string is ignored); returns (base URL, server)."""

    class Handler(BytesHandler):
        def do_GET(self):
            self.answer(files.get(self.path.split("?")[0]))

    return start_server(Handler)
