"""Request bodies in the app (as `python _wsgi.py` serves it; under gunicorn the worker refuses them even earlier,
tests/test_slow_clients.py): each route's limit is checked from the Content-Length before anything is read, a
body without one is read no further than the limit, and bodies being parsed share REQUEST_BODY_BUDGET_BYTES."""

from __future__ import annotations

import io
import threading
import time

import pytest

from segnext_backend.settings import Settings


class UnreadableStream(io.BytesIO):
    """A body that must not be read."""

    def read(self, size=-1):
        raise AssertionError("the body was read")

    readinto = read1 = readline = read


class HeldStream(io.BytesIO):
    """A body that arrives once `release` is set."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.release = threading.Event()
        self.reading = threading.Event()

    def read(self, size=-1):
        self.reading.set()
        self.release.wait(60)
        return super().read(size)

    def readinto(self, buffer):
        self.reading.set()
        self.release.wait(60)
        return super().readinto(buffer)


@pytest.mark.parametrize("route, setting", [("/predict", "MAX_PREDICT_BODY_BYTES"), ("/setup", "MAX_SETUP_BODY_BYTES"),
                                            ("/webhook", "MAX_WEBHOOK_BODY_BYTES")])
def test_each_route_refuses_a_body_over_its_limit_before_reading_it(make_client, route, setting):
    client, spy = make_client()
    limit = getattr(Settings(), setting.lower())
    answer = client.post(route, input_stream=UnreadableStream(), content_type="application/json",
                         environ_overrides={"CONTENT_LENGTH": str(limit + 1)})
    assert answer.status_code == 413 and setting in answer.json["error"] and str(limit) in answer.json["error"]
    assert spy.encodes == 0


def test_a_body_without_content_length_is_read_up_to_its_limit_only(make_client):
    client, _ = make_client(max_webhook_body_bytes=1000)
    stream = io.BytesIO(b'{"action": "' + b"x" * 10_000_000 + b'"}')
    chunked = {"wsgi.input_terminated": True, "CONTENT_LENGTH": ""}  # as a server passes a chunked body on
    answer = client.post("/webhook", input_stream=stream, content_type="application/json", environ_overrides=chunked)
    assert answer.status_code == 413 and "MAX_WEBHOOK_BODY_BYTES" in answer.json["error"]
    assert stream.tell() <= 1000 + 1 + 1024 * 1024  # at most the limit and one read beyond it
    small = client.post("/webhook", input_stream=io.BytesIO(b'{"action": "PING"}'), content_type="application/json",
                        environ_overrides=chunked)
    assert small.status_code == 200 and small.json["action"] == "PING"


def test_bodies_being_parsed_wait_for_the_budget(make_client):
    client, _ = make_client(request_body_budget_bytes=1000)
    first_body = HeldStream(b'{"action": "first"}' + b" " * 700)
    answers = {}

    def post(name, stream):
        answers[name] = client.post("/webhook", input_stream=stream, content_type="application/json")

    first = threading.Thread(target=post, args=("first", first_body))
    first.start()
    assert first_body.reading.wait(30)  # the first body holds 719 of the 1000 bytes while it arrives
    second = threading.Thread(target=post, args=("second", io.BytesIO(b'{"action": "second"}' + b" " * 480)))
    second.start()
    time.sleep(1.0)
    assert "second" not in answers  # 719 + 500 > 1000: waits, not parsed alongside
    first_body.release.set()
    first.join(60)
    second.join(60)
    assert answers["first"].json["action"] == "first" and answers["second"].json["action"] == "second"
