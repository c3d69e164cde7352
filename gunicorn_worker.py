"""gunicorn's threaded worker, made safe against slow clients: `worker_class` in gunicorn.conf.py.

gunicorn's gthread worker gives a connection a thread as soon as its first byte arrives, and the thread then
reads the rest of the request with blocking reads and no deadline: ten connections that send a request line
and then nothing held all eight threads, and `/health` got no answer, for as long as they stayed open (basic
auth is checked only once the request is read). A client that never reads a large answer does the same.

This worker receives each request whole before a thread works on it:
- A thread takes whatever bytes have arrived, without waiting, and hands the connection back to gunicorn's
  poller until more arrive; so a slow client costs a short turn per packet, never a waiting thread.
- A request must be whole (headers and body) within REQUEST_READ_TIMEOUT seconds of its first byte; a
  connection that falls silent for gunicorn's keep-alive time (2 s) before that is closed too.
- A body over its route's limit (MAX_PREDICT_BODY_BYTES and the others, from the Content-Length, or as a
  chunked body grows) is answered 413 before it is received; bytes held for requests not yet answered count
  against REQUEST_BODY_BUDGET_BYTES (503 beyond it).
- Once the request is whole the app runs as gunicorn runs it. What of its answer the client does not take at
  once is kept (within REQUEST_BODY_BUDGET_BYTES) and sent by the poller, so the thread is free at once; an
  answer not taken whole within RESPONSE_SEND_TIMEOUT seconds closes the connection. (Past the budget the
  thread sends the rest itself, until that deadline.)
Plain HTTP/1.x only (Label Studio calls the backend so): TLS belongs in a proxy in front.
"""

from __future__ import annotations

import errno
import json
import selectors
import socket
import threading
import time
from collections import deque
from functools import partial

from gunicorn.workers.gthread import _DEFER, TConn, ThreadWorker

from segnext_backend.limits import body_budget_exhausted, body_limit, body_too_large
from segnext_backend.settings import Settings

MAX_HEAD_BYTES = 64 * 1024  # request line and header fields (gunicorn's own limits are within this)
_RECV_BYTES = 256 * 1024
# A connection being closed with an answer sent: what the client still sends is read and dropped for this
# long (at most this much), in the poller, so that the kernel does not reset the connection before the client
# has read the answer (a 413 sent while the body is still arriving, say).
LINGER_SECONDS = 2.0
LINGER_MAX_BYTES = 64 * 1024 * 1024


class DeadlineSocket(socket.socket):
    """A client socket whose reads and writes, once a request is handed to the app, end at deadlines.

    A read after `read_deadline` (or one that waits past it) reads as the end of the stream, which gunicorn
    treats as a client gone. With an `outbox`, what a write cannot send at once is kept there for the poller
    (as long as `keep(size)` allows); a write that must wait, and that the client does not take by
    `send_deadline`, fails as a broken pipe, which gunicorn logs at debug level and answers by closing."""

    read_deadline: float | None = None
    send_timeout: float | None = None
    send_deadline: float | None = None
    outbox: bytearray | None = None
    keep = None  # size -> whether `size` more bytes may wait in the outbox

    @classmethod
    def taking_over(cls, sock: socket.socket) -> "DeadlineSocket":
        return cls(sock.family, sock.type, sock.proto, fileno=sock.detach())

    def _remaining(self, deadline: float) -> float:
        return deadline - time.monotonic()

    def recv(self, size, *flags):
        if self.read_deadline is None:
            return super().recv(size, *flags)
        remaining = self._remaining(self.read_deadline)
        if remaining <= 0:
            return b""
        self.settimeout(remaining)
        try:
            return super().recv(size, *flags)
        except TimeoutError:
            return b""

    def sendall(self, data, *flags):
        if self.send_timeout is None:
            return super().sendall(data, *flags)
        if self.send_deadline is None:
            self.send_deadline = time.monotonic() + self.send_timeout
        data = memoryview(data).cast("B")
        if self.outbox is not None:
            if not self.outbox:  # what the socket takes now goes now
                self.setblocking(False)
                try:
                    data = data[socket.socket.send(self, data):]
                except (BlockingIOError, InterruptedError):
                    pass
                finally:
                    self.setblocking(True)
            if not data:
                return None
            if self.keep(len(data)):
                self.outbox += data
                return None
            waiting, self.outbox = bytes(self.outbox), bytearray()  # over the budget: this thread sends it
            self._send_by_deadline(waiting)
        self._send_by_deadline(data)
        return None

    def _send_by_deadline(self, data) -> None:
        remaining = self._remaining(self.send_deadline)
        if remaining <= 0:
            raise BrokenPipeError(errno.EPIPE, "the client did not take the answer in time (RESPONSE_SEND_TIMEOUT)")
        self.settimeout(remaining)
        try:
            super().sendall(data)
        except TimeoutError:
            raise BrokenPipeError(errno.EPIPE, "the client did not take the answer in time (RESPONSE_SEND_TIMEOUT)") from None

    def send(self, data, *flags):  # gunicorn writes with sendall; this keeps any other write under the deadline
        self.sendall(data, *flags)
        return len(data)


class ByteBudget:
    """Bytes held by requests being received or served, over all connections of the worker."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.held + size > self.capacity:
                return False
            self.held += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.held -= size


class BufferedConn(TConn):
    """A connection and the request it is receiving."""

    def __init__(self, cfg, sock, client, server, budget: ByteBudget):
        super().__init__(cfg, sock, client, server)
        self.budget = budget
        self.received = bytearray()
        self.held = 0  # bytes of `budget` this connection's request holds
        self.answer_held = 0  # and the part of its answer not sent yet
        self.request_deadline: float | None = None  # None: no request begun
        self.framing: RequestFraming | None = None

    def hold(self, size: int) -> bool:
        if not self.budget.take(size):
            return False
        self.held += size
        return True

    def keep_answer(self, size: int) -> bool:
        if not self.budget.take(size):
            return False
        self.answer_held += size
        return True

    def release(self) -> None:
        """Give back the request's bytes."""
        self.budget.give_back(self.held)
        self.held = 0

    def release_answer(self) -> None:
        self.budget.give_back(self.answer_held)
        self.answer_held = 0
        self.sock.outbox = None

    def close(self, graceful=False):
        self.release()
        self.release_answer()
        super().close(graceful)


INCOMPLETE, COMPLETE, TOO_LARGE, HEAD_TOO_LARGE = "incomplete", "complete", "too large", "head too large"


class RequestFraming:
    """Where one HTTP/1.x request ends in the bytes received so far, read incrementally (a chunked body is
    scanned once, however it arrives). Anything it cannot read is left to gunicorn's parser, which answers it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.body_start: int | None = None
        self.content_length: int | None = None
        self.chunked = False
        self.limit = 0
        self.limit_setting = ""
        self.scan = 0  # chunked: where the next chunk-size line starts
        self.body_size = 0  # chunked: body bytes so far
        self.expects_continue = False  # `Expect: 100-continue`: the client waits for a 100 before its body

    def examine(self, data: bytearray) -> str:
        if self.body_start is None:
            head_end = data.find(b"\r\n\r\n")
            if head_end < 0:
                return HEAD_TOO_LARGE if len(data) > MAX_HEAD_BYTES else INCOMPLETE
            if head_end > MAX_HEAD_BYTES:
                return HEAD_TOO_LARGE
            self._read_head(bytes(data[:head_end]))
            self.body_start = self.scan = head_end + 4
            if self.content_length is not None and self.content_length > self.limit:
                return TOO_LARGE
        if self.chunked:
            return self._scan_chunks(data)
        if self.content_length is None:
            return COMPLETE
        return COMPLETE if len(data) - self.body_start >= self.content_length else INCOMPLETE

    def _read_head(self, head: bytes) -> None:
        request_line, *fields = head.split(b"\r\n")
        parts = request_line.split(b" ")
        path = parts[1].split(b"?", 1)[0].decode("latin-1") if len(parts) == 3 else "/"
        self.limit, self.limit_setting = body_limit(self.settings, path)
        for line in fields:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length" and value.strip().isdigit():
                self.content_length = int(value.strip())
            elif name == b"transfer-encoding" and value.strip().lower().endswith(b"chunked"):
                self.chunked = True
            elif name == b"expect" and value.strip().lower() == b"100-continue" and parts[-1:] == [b"HTTP/1.1"]:
                self.expects_continue = True

    def _scan_chunks(self, data: bytearray) -> str:
        while True:
            line_end = data.find(b"\r\n", self.scan)
            if line_end < 0:
                return TOO_LARGE if len(data) - self.scan > MAX_HEAD_BYTES else INCOMPLETE
            try:
                size = int(bytes(data[self.scan:line_end]).split(b";", 1)[0].strip(), 16)
            except ValueError:
                return COMPLETE  # malformed: gunicorn's parser refuses it
            if size == 0:  # the last chunk: then trailer fields, up to an empty line
                if data[line_end:line_end + 4] == b"\r\n\r\n":
                    return COMPLETE
                trailers_end = data.find(b"\r\n\r\n", line_end)
                if trailers_end >= 0:
                    return COMPLETE
                return TOO_LARGE if len(data) - line_end > MAX_HEAD_BYTES else INCOMPLETE
            self.body_size += size
            if self.body_size > self.limit:
                return TOO_LARGE
            next_chunk = line_end + 2 + size + 2
            if next_chunk > len(data):
                self.body_size -= size  # counted again when the chunk is whole
                return INCOMPLETE
            self.scan = next_chunk


def _json_answer(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class BufferingThreadWorker(ThreadWorker):
    """gunicorn's gthread worker that gives a request a thread only once it has arrived whole (see above)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.cfg.is_ssl:
            raise RuntimeError("this worker serves plain HTTP: terminate TLS in a proxy in front of it")
        self.settings = Settings.from_env()
        self.budget = ByteBudget(self.settings.request_body_budget_bytes)
        self.lingering: deque[tuple[float, BufferedConn]] = deque()
        self.sending: list[BufferedConn] = []  # answers the poller is sending

    def accept(self, listener):
        try:
            client_sock, client_addr = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = BufferedConn(
            self.cfg, DeadlineSocket.taking_over(client_sock), client_addr, listener.getsockname(), self.budget
        )
        # Straight to the poller: a thread is given once bytes have arrived.
        self.finish_request(conn, _done(_DEFER))

    def handle(self, conn: BufferedConn):
        outcome = self._receive(conn)
        if outcome is not COMPLETE:
            return _DEFER if outcome is INCOMPLETE else False
        conn.init()
        conn.parser.unreader.unread(bytes(conn.received))
        conn.received = bytearray()
        sock = conn.sock
        sock.read_deadline = conn.request_deadline
        sock.send_timeout = self.settings.response_send_timeout
        sock.send_deadline = None
        sock.outbox, sock.keep = bytearray(), conn.keep_answer
        conn.request_deadline = conn.framing = None
        conn.data_ready = True
        try:
            keepalive = super().handle(conn)
        finally:
            conn.release()
            sock.read_deadline = None
        if sock.outbox:
            return _Unsent(keepalive)  # the poller sends the rest (finish_request), then goes on
        conn.release_answer()
        sock.send_timeout = None
        return keepalive

    def _receive(self, conn: BufferedConn) -> str:
        """Take the bytes that have arrived, without waiting. COMPLETE when the request is whole; INCOMPLETE to
        wait for more in the poller; anything else: the connection is to be closed (answered if need be)."""
        sock = conn.sock
        if conn.request_deadline is None:  # a new request; a kept-alive parser may hold its first bytes
            conn.request_deadline = time.monotonic() + self.settings.request_read_timeout
            conn.framing = RequestFraming(self.settings)
            if conn.parser is not None:
                held = conn.parser.unreader.take_buffered()
                if held and not conn.hold(len(held)):
                    return self._refuse(conn, "503 Service Unavailable", body_budget_exhausted(self.budget.capacity))
                conn.received += held
        sock.setblocking(False)
        try:
            while True:
                if time.monotonic() > conn.request_deadline:
                    return "late"  # REQUEST_READ_TIMEOUT: closed without an answer, as a client gone
                outcome = conn.framing.examine(conn.received) if conn.received else INCOMPLETE
                if outcome is TOO_LARGE:
                    framing = conn.framing
                    size = framing.content_length if not framing.chunked else None
                    return self._refuse(conn, "413 Payload Too Large", body_too_large(size, framing.limit, framing.limit_setting))
                if outcome is HEAD_TOO_LARGE:
                    return self._refuse(conn, "431 Request Header Fields Too Large", f"the request head is over {MAX_HEAD_BYTES} bytes")
                if outcome is COMPLETE:
                    return COMPLETE
                if conn.framing.expects_continue:  # the body is wanted: say so now (gunicorn says it again later,
                    conn.framing.expects_continue = False  # which a client reads as one more 1xx answer)
                    try:
                        socket.socket.send(sock, b"HTTP/1.1 100 Continue\r\n\r\n")
                    except OSError:
                        return "gone"
                try:
                    data = socket.socket.recv(sock, _RECV_BYTES)
                except (BlockingIOError, InterruptedError):
                    return INCOMPLETE
                except OSError:
                    return "gone"
                if not data:
                    return "gone"
                if not conn.hold(len(data)):
                    return self._refuse(conn, "503 Service Unavailable", body_budget_exhausted(self.budget.capacity))
                conn.received += data
        finally:
            sock.setblocking(True)

    def finish_request(self, conn, fs):
        try:
            result = fs.result() if not fs.cancelled() else False
        except Exception:
            result = False
        if isinstance(result, _Unsent):
            try:
                conn.sock.setblocking(False)
                self.poller.register(conn.sock, selectors.EVENT_WRITE, partial(self._send_unsent, conn, result.keepalive))
            except (OSError, ValueError, KeyError):
                self.nr_conns -= 1
                conn.close()
                return None
            self.sending.append(conn)
            return None
        if result:
            return super().finish_request(conn, fs)
        # Closing: gunicorn would linger on the connection with a blocking read in this, the poller's thread
        # (up to 2 s per connection, while no other connection is served); lingering goes through the poller.
        self.nr_conns -= 1
        conn.release()
        try:
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.setblocking(False)
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._drain, conn))
        except (OSError, ValueError, KeyError):
            conn.close()
            return None
        conn.lingered = 0
        self.lingering.append((time.monotonic() + LINGER_SECONDS, conn))
        return None

    def _send_unsent(self, conn: BufferedConn, keepalive: bool, _sock) -> None:
        outbox = conn.sock.outbox
        try:
            sent = socket.socket.send(conn.sock, memoryview(outbox)[:_RECV_BYTES])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._stop_sending(conn)
            self.nr_conns -= 1
            conn.close()
            return
        del outbox[:sent]
        if outbox:
            return
        self._stop_sending(conn)
        conn.release_answer()
        conn.sock.send_timeout = None
        self.finish_request(conn, _done(keepalive))  # kept alive, or closed, as the answer said

    def _stop_sending(self, conn: BufferedConn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass
        self.sending.remove(conn)

    def _drain(self, conn: BufferedConn, _sock) -> None:
        try:
            data = socket.socket.recv(conn.sock, _RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.lingered += len(data)
        if not data or conn.lingered > LINGER_MAX_BYTES:
            self._end_linger(conn)

    def _end_linger(self, conn: BufferedConn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass
        conn.close()

    def murder_pending(self):
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.sending if c.sock.send_deadline <= now]:  # RESPONSE_SEND_TIMEOUT
            self._stop_sending(conn)
            self.nr_conns -= 1
            conn.close()
        while self.lingering and (self.lingering[0][0] <= now or self.lingering[0][1].sock.fileno() < 0):
            self._end_linger(self.lingering.popleft()[1])

    def _refuse(self, conn: BufferedConn, status: str, message: str) -> str:
        self.log.info("%s refused: %s", conn.client, message)
        conn.release()
        conn.received = bytearray()
        try:
            conn.sock.settimeout(self.settings.response_send_timeout)
            socket.socket.sendall(conn.sock, _json_answer(status, message))
        except OSError:
            pass
        return "refused"


class _Unsent:
    """A handled request whose answer is partly unsent: the poller sends the rest, then `keepalive` decides."""

    def __init__(self, keepalive: bool):
        self.keepalive = keepalive


class _done:
    """A finished future carrying `result`, for gunicorn's finish_request."""

    def __init__(self, result):
        self._result = result

    def cancelled(self) -> bool:
        return False

    def result(self):
        return self._result
