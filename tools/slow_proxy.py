"""A TCP proxy on 127.0.0.1 that delays what clients send by `delay` seconds: a server that is alive but slow.

Used to make a real Redis answer each call late (tests, `tools.hostile_check`): every byte a client sends
reaches the server `delay` seconds after it arrived, so each request-reply round trip takes `delay` longer,
however large the request (its chunks are delayed together, not one after another). `delay` may be changed
while connections are open.
"""

from __future__ import annotations

import queue
import socket
import threading
import time


class SlowProxy:
    def __init__(self, target_port: int, delay: float = 0.0, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="slow-proxy-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            pending: queue.Queue = queue.Queue()
            threading.Thread(target=self._read_delayed, args=(client, pending), daemon=True).start()
            threading.Thread(target=self._send_delayed, args=(pending, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    def _read_delayed(self, source: socket.socket, pending: queue.Queue) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            pending.put((time.monotonic() + self.delay, data))
            if not data:
                return

    @staticmethod
    def _send_delayed(pending: queue.Queue, destination: socket.socket) -> None:
        while True:
            due, data = pending.get()
            time.sleep(max(0.0, due - time.monotonic()))
            if not _forward(data, destination):
                return

    @staticmethod
    def _pipe(source: socket.socket, destination: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not _forward(data, destination):
                return

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._sockets:
            _shutdown(sock)
            sock.close()


def _forward(data: bytes, destination: socket.socket) -> bool:
    """Send `data` on; False once the stream is over: the source ended (b"", passed on as a shutdown) or the
    destination is gone."""
    if not data:
        _shutdown(destination)
        return False
    try:
        destination.sendall(data)
    except OSError:
        return False
    return True


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
