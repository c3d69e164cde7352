"""ONNX Runtime's OpenVINO build (requirements-openvino.txt): what the OpenVINO image does.

The backend runs from a virtual environment of its own, `.cache/venv-onnxruntime-openvino/` (made on the first
run and kept until a requirements file changes): the serving requirements as the Dockerfile installs them, with
onnxruntime replaced by onnxruntime-openvino (the wheel carries the OpenVINO runtime). Checked: DEVICE=openvino
serves right clicks and says in /health which provider runs them and in what precision; bf16 logits stay close
to float32's on SegNext's own architecture; the standard build refuses DEVICE=openvino, naming what to install.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import requests
from conftest import (
    ROOT, assert_click_finds_object, backend_env, backend_log, free_port, make_scene, onnxruntime_build_python,
)

from segnext_backend import device

OPENVINO_VENV = ROOT / ".cache" / "venv-onnxruntime-openvino"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or sys.maxsize < 2**32, reason="onnxruntime-openvino wheels: 64-bit Linux here"
)


def onnxruntime_openvino_pin() -> str:
    for line in (ROOT / "requirements-openvino.txt").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement.startswith("onnxruntime-openvino"):
            return requirement
    raise AssertionError("requirements-openvino.txt pins no onnxruntime-openvino")


@pytest.fixture(scope="module")
def openvino_python() -> Path:
    return onnxruntime_build_python(
        OPENVINO_VENV, "requirements-openvino.txt", onnxruntime_openvino_pin(), "OpenVINOExecutionProvider"
    )


def expected_precision() -> str:
    return "bf16" if device._cpu_flags() & set(device.BF16_CPU_FLAGS) else "f32"


@pytest.mark.parametrize("gunicorn", [False, True], ids=["_wsgi.py", "gunicorn"])  # gunicorn: the image's command
def test_device_openvino_serves_right_clicks_and_names_its_precision(
    openvino_python, image_server, started_backend, tmp_path, gunicorn
):
    url = started_backend(
        gunicorn, python=openvino_python, DEMO="true", DEVICE="openvino", LABEL_STUDIO_URL=image_server.url
    )
    health = requests.get(url + "/health", timeout=30).json()
    assert health["device"] == "openvino" and health["execution_provider"] == "OpenVINOExecutionProvider", health
    assert health["openvino_precision"] == expected_precision()
    scene = make_scene(800, 600, seed=32)
    for index in (2, 0):  # a second object after the first, as an annotator goes on
        assert_click_finds_object(url, image_server, scene, index, "openvino-build")
    log = backend_log(tmp_path, url).read_text()
    assert f"execution provider: OpenVINOExecutionProvider, computing in {expected_precision()}" in log, log


def test_bf16_logits_follow_float32_on_segnexts_architecture(openvino_python, shallow_models):
    """The shallow SegNext export (true widths, random weights) run by ONNX Runtime's CPU provider in float32
    and by OpenVINO as the backend asks for it: the logits must keep float32's signs almost everywhere."""
    encoder, decoder = shallow_models
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from segnext_backend.device import choose_execution_providers
        from segnext_backend.engine import SegNextEngine
        rng = np.random.default_rng(0)
        image = rng.random((1, 3, 1024, 1024), dtype=np.float32)
        points, labels = np.array([[500.0, 400.0], [300.0, 650.0]], np.float32), np.array([1.0, 0.0], np.float32)
        logits = {{}}
        for name, providers in (("f32", ["CPUExecutionProvider"]), ("openvino", choose_execution_providers("openvino", threads=2))):
            engine = SegNextEngine({str(encoder)!r}, {str(decoder)!r}, intra_op_threads=2, providers=providers)
            features = engine.encode(image)
            logits[name] = engine.decode(features, points, labels, np.zeros((1024, 1024), np.float32))
            print(name, engine.execution_providers[0], engine.openvino_precision, file=sys.stderr)
        a, b = logits["f32"], logits["openvino"]
        agree = float(((a > 0) == (b > 0)).mean())
        relative = float(np.abs(a - b).mean() / np.abs(a).mean())
        print(json.dumps({{"agree": agree, "relative": relative}}))
        """
    )
    result = subprocess.run([str(openvino_python), "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "openvino OpenVINOExecutionProvider" in result.stderr
    import json

    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["agree"] > 0.98 and measured["relative"] < 0.05, measured


def test_the_standard_build_refuses_device_openvino_naming_what_to_install(tmp_path):
    env = backend_env(tmp_path, DEMO="true", DEVICE="openvino", PORT=str(free_port()))
    result = subprocess.run([sys.executable, "_wsgi.py", "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "DEVICE=openvino, but this ONNX Runtime" in result.stderr and "requirements-openvino.txt" in result.stderr, result.stderr
