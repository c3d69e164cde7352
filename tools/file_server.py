"""A throwaway HTTP server on 127.0.0.1 that serves byte strings by path: Label Studio's stand-in for the
benchmark and the load test."""

from __future__ import annotations

import http.server
import threading


def serve_files(files: dict[str, bytes]) -> tuple[str, http.server.ThreadingHTTPServer]:
    """Start serving `files` (path -> bytes; the query string is ignored); returns (base URL, server)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            content = files.get(self.path.split("?")[0])
            if content is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_port}", httpd
