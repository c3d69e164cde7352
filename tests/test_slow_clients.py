"""Slow and greedy clients against the backend under gunicorn (gunicorn.conf.py, as Docker and serve.sh run it),
on loopback: a connection that does not deliver its whole request within REQUEST_READ_TIMEOUT, or does not take
its answer within RESPONSE_SEND_TIMEOUT, is closed and its thread freed, so `/health` answers while THREADS + 2
of them are open; bodies over their route's limit are refused from their headers, chunked ones as they grow,
and bodies held at once stay within REQUEST_BODY_BUDGET_BYTES."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from gunicorn_worker import COMPLETE, INCOMPLETE, TOO_LARGE, RequestFraming
from segnext_backend.settings import Settings

THREADS = 2
SLOW = THREADS + 2
DEADLINE_SECONDS = 3
# Generous, for a loaded 2-core machine: without the protection /health is never answered while the slow
# clients go on, and they go on for longer than this.
ANSWER_WITHIN_SECONDS = 40
CLOSED_WITHIN_SECONDS = 60
USER, PASSWORD = "annotator", "s3cret"


def backend(started_backend, auth: bool, **extra) -> str:
    env = dict(DEMO="true", THREADS=str(THREADS), REQUEST_READ_TIMEOUT=str(DEADLINE_SECONDS),
               RESPONSE_SEND_TIMEOUT=str(DEADLINE_SECONDS))
    env.update(extra)
    if auth:
        env.update(BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD)
    return started_backend(gunicorn=True, **env)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


class SlowClient(threading.Thread):
    """Sends `first`, then `step` every `pause` seconds (forever, or until the server closes the connection, or
    `stop`): `closed_after` is how long the server let it go on. Without a `step` it sends `first` and never
    reads: more than the socket buffers hold, so that its send ends only when the server closes."""

    def __init__(self, url: str, first: bytes, step: bytes, pause: float = 0.5, receive_buffer: int | None = None):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        if receive_buffer:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(address(url))
        self.first, self.step, self.pause = first, step, pause
        self.stop = threading.Event()
        self.closed_after: float | None = None

    def run(self):
        started = time.monotonic()
        try:
            self.sock.sendall(self.first)
            while self.step and not self.stop.wait(self.pause):
                self.sock.sendall(self.step)
        except OSError:
            self.closed_after = time.monotonic() - started


def health_while(url: str, clients: list, auth: bool, settle: float = 1.0, within: float = ANSWER_WITHIN_SECONDS) -> None:
    for client in clients:
        client.start()
    try:
        time.sleep(settle)  # every slow client has sent its first bytes and holds (or would hold) a thread
        started = time.monotonic()
        answer = requests.get(url + "/health", auth=(USER, PASSWORD) if auth else None, timeout=within)
        assert answer.status_code == 200, answer.text
        if auth:
            assert requests.get(url + "/health", timeout=ANSWER_WITHIN_SECONDS).status_code == 401
        print(f"/health answered in {time.monotonic() - started:.2f} s with {len(clients)} slow clients")
        for client in clients:
            client.join(CLOSED_WITHIN_SECONDS)
            assert client.closed_after is not None, "a slow client's connection was not closed"
    finally:
        for client in clients:
            client.stop.set()
            client.sock.close()


@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "basic-auth"])
def test_slow_clients_never_hold_every_thread(started_backend, auth):
    url = backend(started_backend, auth)
    # Slowloris: a request line, then one header byte every half second (never the end of the head).
    head = [SlowClient(url, b"POST /predict HTTP/1.1\r\nHost: x\r\n", b"X") for _ in range(SLOW)]
    health_while(url, head, auth)
    # A whole head, then the body a hundred bytes at a time.
    body = [SlowClient(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 100000\r\n\r\n{", b" " * 100) for _ in range(SLOW)]
    health_while(url, body, auth)
    # A client that sends its request and then nothing more is closed within REQUEST_READ_TIMEOUT too.
    for client in head + body:
        assert client.closed_after < DEADLINE_SECONDS + 30
    # Honest requests are served as before.
    answer = requests.post(url + "/predict", json={"tasks": []}, auth=(USER, PASSWORD) if auth else None, timeout=60)
    assert answer.status_code == 400 and "no tasks" in answer.json()["error"]


def test_clients_that_never_read_their_answer_hold_no_thread_and_are_cut_off(started_backend):
    send_timeout = 30
    url = backend(started_backend, auth=False, RESPONSE_SEND_TIMEOUT=str(send_timeout))
    # The webhook's answer repeats the action: ~800 KB each; twenty pipelined requests whose answers are never
    # read fill the socket buffers (4 MB at most on Linux), so a thread writing them would block. The rest of
    # an answer waits for the poller instead: /health is answered long before RESPONSE_SEND_TIMEOUT, when a
    # thread blocked in its write would be freed, and the connections are closed at that deadline.
    one = json.dumps({"action": "x" * 800_000}).encode()
    request = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(one) + one
    greedy = [SlowClient(url, request * 20, b"", receive_buffer=4096) for _ in range(SLOW)]
    health_while(url, greedy, auth=False, settle=3.0, within=send_timeout - 10)


def raw_request(url: str, data: bytes, timeout: float = 60) -> tuple[int, dict]:
    """Send `data` and read the answer until the server closes the connection: (status, JSON body)."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # refused early: the answer is there to read
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer:
                head, _, rest = answer.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
    head, _, rest = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(rest)


def test_bodies_over_their_route_s_limit_are_refused_from_the_headers_or_as_they_grow(started_backend):
    url = backend(started_backend, auth=False)
    limits = Settings()
    # Only the head: refused at once from its Content-Length, without waiting for a body that never comes.
    for path, setting, limit in (("/predict", "MAX_PREDICT_BODY_BYTES", limits.max_predict_body_bytes),
                                 ("/setup", "MAX_SETUP_BODY_BYTES", limits.max_setup_body_bytes),
                                 ("/webhook", "MAX_WEBHOOK_BODY_BYTES", limits.max_webhook_body_bytes)):
        status, body = raw_request(url, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n\r\n".encode(), timeout=30)
        assert status == 413 and setting in body["error"] and str(limit) in body["error"], body
    # Chunked, no Content-Length: refused once what arrived is over the limit.
    chunk = b"x" * 65536
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(limits.max_setup_body_bytes // len(chunk) + 1))
    status, body = raw_request(url, b"POST /setup HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n")
    assert status == 413 and "MAX_SETUP_BODY_BYTES" in body["error"], body
    # A chunked body within the limit is read and parsed.
    answer = requests.post(url + "/predict", data=iter([b'{"tasks"', b": []}"]), timeout=60)
    assert answer.status_code == 400 and "no tasks" in answer.json()["error"]
    # A large body that is sent whole gets the same answer as its head alone (python-requests sees the 413).
    answer = requests.post(url + "/webhook", data=b" " * (limits.max_webhook_body_bytes + 1), timeout=60)
    assert answer.status_code == 413 and "MAX_WEBHOOK_BODY_BYTES" in answer.json()["error"]


def test_bodies_held_at_once_stay_within_the_budget(started_backend):
    budget = 1_000_000
    url = backend(started_backend, auth=False, REQUEST_BODY_BUDGET_BYTES=str(budget))
    holder = socket.create_connection(address(url))
    holder.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n" + b" " * 800_000)
    try:
        time.sleep(1.0)  # received, held: 800 KB of the budget
        status, body = raw_request(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n" + b" " * 300_000)
        assert status == 503 and "REQUEST_BODY_BUDGET_BYTES" in body["error"], body
    finally:
        holder.close()
    deadline = time.monotonic() + 60
    while True:  # once the holder is gone its bytes are given back
        status, body = raw_request(url, b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n{"tasks": []}' + b" " * (300_000 - 13))
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 400 and "no tasks" in body["error"], body


def test_a_client_that_expects_100_continue_gets_it_before_sending_its_body(started_backend):
    # curl sends `Expect: 100-continue` with a body over 1 KB and waits for the 100 (a second, then sends anyway):
    # the worker, which waits for the whole body, says "continue" as soon as the head is in.
    url = backend(started_backend, auth=False)
    body = b'{"tasks": []}' + b" " * 5000
    with socket.create_connection(address(url), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while b'"error"' not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert b"HTTP/1.1 400" in answer and b"no tasks" in answer


@pytest.mark.parametrize("request_bytes", [
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\n{\"tasks\": []}",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n{\"tasks\"\r\n5;ext=1\r\n: []}\r\n0\r\n\r\n",
    b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: 1\r\n\r\n",
], ids=["no-body", "content-length", "chunked", "chunked-with-trailer"])
def test_a_request_is_whole_only_at_its_last_byte_however_it_arrives(request_bytes):
    framing, received = RequestFraming(Settings()), bytearray()
    for byte in request_bytes[:-1]:
        received.append(byte)
        assert framing.examine(received) == INCOMPLETE
    received += request_bytes[-1:]
    assert framing.examine(received) == COMPLETE


def test_a_chunked_body_is_too_large_as_soon_as_a_chunk_says_so():
    framing = RequestFraming(Settings(max_webhook_body_bytes=100))
    head = b"POST /webhook HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert framing.examine(bytearray(head + b"40\r\n" + b"x" * 64 + b"\r\n")) == INCOMPLETE
    assert framing.examine(bytearray(head + b"40\r\n" + b"x" * 64 + b"\r\n40\r\n")) == TOO_LARGE
