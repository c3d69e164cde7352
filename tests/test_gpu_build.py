"""The GPU build of ONNX Runtime on a machine without a GPU: what the GPU image does there.

The backend runs from a virtual environment of its own, `.cache/venv-onnxruntime-gpu/` (made on the first run
and kept until a requirements file changes): the serving requirements as the Dockerfile installs them, with
onnxruntime replaced by requirements-gpu.txt's onnxruntime-gpu (a 256 MB wheel) but without its [cuda,cudnn]
extras, the NVIDIA libraries (several GB) that a machine without a GPU cannot use; their absence is one of the
things `DEVICE=cuda` must name. Checked: `onnxruntime.preload_dlls()` runs, `DEVICE=auto` serves a right click
on the CPU and says so in /health, and `DEVICE=cuda` refuses to start, naming the driver and the library.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import (
    ROOT, assert_click_finds_object, backend_env, backend_log, free_port, make_scene, onnxruntime_build_python,
)

from segnext_backend import device

GPU_VENV = ROOT / ".cache" / "venv-onnxruntime-gpu"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or device.driver_problem() is None,
    reason="these tests describe a Linux machine without a usable NVIDIA GPU",
)


def onnxruntime_gpu_without_extras() -> str:
    for line in (ROOT / "requirements-gpu.txt").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement.startswith("onnxruntime-gpu"):
            return re.sub(r"\[[^]]*\]", "", requirement)
    raise AssertionError("requirements-gpu.txt pins no onnxruntime-gpu")


@pytest.fixture(scope="module")
def gpu_python() -> Path:
    """The python of the GPU-build environment, made (or remade, when a requirements file changed) first."""
    return onnxruntime_build_python(GPU_VENV, "requirements-gpu.txt", onnxruntime_gpu_without_extras(), "CUDAExecutionProvider")


def test_device_auto_preloads_the_libraries_then_serves_a_right_click_on_the_cpu(gpu_python, image_server, started_backend, tmp_path):
    url = started_backend(python=gpu_python, DEMO="true", DEVICE="auto", LABEL_STUDIO_URL=image_server.url)
    health = requests.get(url + "/health", timeout=30).json()
    assert health["device"] == "auto" and health["execution_provider"] == "CPUExecutionProvider"
    assert_click_finds_object(url, image_server, make_scene(800, 600, seed=31), 2, "gpu-build")
    text = backend_log(tmp_path, url).read_text()
    # preload_dlls ran (it reports the CUDA libraries that the [cuda] extra would have brought) ...
    assert "onnxruntime.preload_dlls: Failed to load libcublasLt.so.13" in text, text
    # ... and the start-up log says that the CPU runs, and why.
    assert "DEVICE=auto: running on the CPU, because the GPU cannot be used: no NVIDIA driver" in text, text
    assert "execution provider: CPUExecutionProvider" in text


@pytest.mark.parametrize("server", ["_wsgi.py", "gunicorn"])
def test_device_cuda_refuses_to_start_naming_the_driver_and_the_library(gpu_python, tmp_path, server):
    env = backend_env(tmp_path, DEMO="true", DEVICE="cuda", PORT=str(free_port()))
    if server == "gunicorn":  # the Docker image's command
        command = [str(gpu_python.parent / "gunicorn"), "-c", "gunicorn.conf.py"]
    else:
        command = [str(gpu_python), "_wsgi.py", "--check"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    message = result.stderr
    assert "DEVICE=cuda, but the GPU cannot be used" in message, message
    assert "no NVIDIA driver (libcuda.so.1" in message  # the driver
    assert "CUDA provider library does not load (libcublasLt.so.13" in message  # the library
    assert "started CPUExecutionProvider instead of CUDAExecutionProvider" in message  # the quiet fallback
