"""A client that goes away in the middle of a /predict must not hurt the server or the clicks after it."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import requests
from conftest import click_on, decode_region, encode_png, iou, make_scene, predict_body


def test_a_client_that_disconnects_mid_request_does_not_hurt_the_server(started_backend, image_server):
    url = started_backend(DEMO="true", LABEL_STUDIO_URL=image_server.url, LABEL_STUDIO_API_KEY="k")
    scene = make_scene(800, 600, seed=31)
    path = image_server.add("/data/upload/1/disconnect.png", encode_png(scene.pixels))
    image_server.delay_seconds = 1.0  # the image answers late: the request is still running when we leave

    body = json.dumps(predict_body(path, [click_on(scene, 0)])).encode()
    host, port = urlsplit(url).hostname, urlsplit(url).port
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    leaver = socket.create_connection((host, port), timeout=5)
    leaver.sendall(head + body)
    # Wait until the server is inside the request (fetching the slow image), then hang up before the answer.
    deadline = time.monotonic() + 5
    while not image_server.requests_for(path):
        assert time.monotonic() < deadline, "the server never fetched the image"
        time.sleep(0.01)
    leaver.setblocking(False)
    try:
        early = leaver.recv(1)
    except BlockingIOError:
        early = b""  # nothing answered yet, as intended
    assert not early, "an answer came before the client left: the test would prove nothing"
    leaver.close()

    # The next click on the same image (another object) is answered correctly, and the server is healthy.
    response = requests.post(url + "/predict", json=predict_body(path, [click_on(scene, 1)]), timeout=30)
    assert response.status_code == 200, response.text
    region = response.json()["results"][0]["result"][0]
    assert iou(decode_region(region, 800, 600), scene.objects[1]) >= 0.98
    # The abandoned click too, now answered from what its request computed.
    again = requests.post(url + "/predict", json=predict_body(path, [click_on(scene, 0)]), timeout=30)
    assert again.status_code == 200, again.text
    assert iou(decode_region(again.json()["results"][0]["result"][0], 800, 600), scene.objects[0]) >= 0.98
    assert requests.get(url + "/health", timeout=5).status_code == 200
    assert len(image_server.requests_for(path)) == 1  # fetched once: the abandoned request's download was kept
