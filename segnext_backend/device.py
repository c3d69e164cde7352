"""Which ONNX Runtime execution provider runs the models: the `DEVICE` setting.

- `cpu`: ONNX Runtime's CPU provider; nothing else is tried.
- `cuda`: the CUDA provider, or a `DeviceError` that names what is missing (an ONNX Runtime build without
  CUDA, a CUDA/cuDNN library that does not load, no NVIDIA driver, no GPU), so the process refuses to start.
- `auto`: the CUDA provider when it works, else the CPU with a warning that says why.
- `openvino`: the OpenVINO provider on the CPU (ONNX Runtime's OpenVINO build, onnxruntime-openvino, in place
  of onnxruntime), computing in `OPENVINO_PRECISION`: bf16 (the default, where the CPU has AVX512_BF16 or AMX:
  about twice float32's speed, docs/performance.md) or f32; or a `DeviceError` naming what is missing.

ONNX Runtime does not fail when its CUDA or OpenVINO provider cannot start: it logs an error and runs the
session on the CPU. Only the session's active providers tell, so the choice is made by running a one-node
model on the providers asked for before the real models are loaded. onnxruntime-gpu's `preload_dlls()` is
called first: it loads the CUDA and cuDNN libraries that pip installed (the `nvidia-*` packages), which the
CUDA provider's library does not find by itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from .cpu import BF16_FLAGS, cpu_flags
from .settings import DEVICES

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
CPU = "CPUExecutionProvider"
BF16_CPU_FLAGS = BF16_FLAGS  # /proc/cpuinfo: the instructions OpenVINO's bf16 kernels use
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # preload_dlls colours its warnings

_OPENVINO_INSTALL_HINT = (
    "install onnxruntime-openvino in place of onnxruntime (requirements-openvino.txt; the Docker image: "
    "--build-arg DEVICE=openvino)"
)
_GPU_INSTALL_HINT = (
    "install onnxruntime-gpu with its CUDA and cuDNN packages in place of onnxruntime "
    "(requirements-gpu.txt; the Docker image: --build-arg DEVICE=auto)"
)


class DeviceError(RuntimeError):
    """DEVICE=cuda or DEVICE=openvino cannot be honoured; the message names everything found missing."""


def choose_execution_providers(device: str, ort=None, *, openvino_precision: str = "bf16", threads: int = 0) -> list:
    """The providers for DEVICE (`cpu`, `cuda`, `auto` or `openvino`), in priority order, as ONNX Runtime takes
    them (a name, or (name, options)); `ort` is the onnxruntime module (a stand-in in tests).

    Raises DeviceError for `cuda` when the GPU cannot be used and for `openvino` when OpenVINO cannot; logs a
    warning for `auto` when it falls back to the CPU.
    """
    if device not in DEVICES:
        raise ValueError(f"DEVICE must be one of {', '.join(DEVICES)}, not {device!r}")
    if device == "cpu":
        return [CPU]
    if ort is None:
        import onnxruntime as ort
    if device == "openvino":
        return [openvino_provider(ort, openvino_precision, threads), CPU]
    problems = cuda_problems(ort)
    if not problems:
        logger.info("DEVICE=%s: ONNX Runtime's CUDA execution provider runs the models", device)
        return [CUDA, CPU]
    reason = "; ".join(problems)
    if device == "cuda":
        raise DeviceError(f"DEVICE=cuda, but the GPU cannot be used: {reason}. (DEVICE=auto would run on the CPU.)")
    logger.warning("DEVICE=auto: running on the CPU, because the GPU cannot be used: %s", reason)
    return [CPU]


def cuda_problems(ort) -> list[str]:
    """Why ONNX Runtime's CUDA provider cannot run a model in this process; empty when it ran one."""
    if CUDA not in ort.get_available_providers():
        return [f"this ONNX Runtime ({_build_name(ort)}) has no CUDA execution provider: {_GPU_INSTALL_HINT}"]
    preload_failures = preload_cuda_libraries(ort)
    failure = _probe(ort)
    if failure is None:
        return []
    # The probe says only that CUDA did not start; these say what is missing, in the order a user fixes them.
    found = [problem for problem in (driver_problem(), provider_library_problem(ort)) if problem]
    if preload_failures:
        found.append("onnxruntime.preload_dlls could not load " + ", ".join(preload_failures))
    return found + [failure]


def preload_cuda_libraries(ort) -> list[str]:
    """Load the pip-installed CUDA and cuDNN libraries as ONNX Runtime documents; returns what failed to load.

    `preload_dlls()` (onnxruntime-gpu >= 1.21) prints what it cannot load instead of raising: its output goes to
    the log, and its "Failed to load ..." lines are returned for the start-up message.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        logger.warning(
            "this onnxruntime-gpu (%s) has no preload_dlls (added in 1.21): the CUDA and cuDNN libraries must be "
            "on the system's library path",
            _build_name(ort),
        )
        return []
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            preload()
        except Exception as error:  # noqa: BLE001  (any failure here is reported, and the probe decides)
            print(f"Failed to preload: {error}")
    lines = [_ANSI_COLOUR.sub("", line).strip() for line in printed.getvalue().splitlines()]
    failed = []
    for line in filter(None, lines):
        logger.info("onnxruntime.preload_dlls: %s", line)
        if line.startswith("Failed to load "):  # "Failed to load <path>: <loader's message>"
            failed.append(Path(line.removeprefix("Failed to load ").split(":", 1)[0]).name)
        elif line.startswith("Failed to"):
            failed.append(line)
    if not failed:
        logger.info("onnxruntime.preload_dlls(): no CUDA or cuDNN library failed to load")
    return failed


def openvino_provider(ort, precision: str, threads: int = 0, cpu_flags: set[str] | None = None) -> tuple[str, dict]:
    """OpenVINO's provider entry, on the CPU, computing in `precision` ("bf16" or "f32"); DeviceError when this
    ONNX Runtime has no OpenVINO provider or OpenVINO does not start (ONNX Runtime then quietly uses the CPU).

    bf16 needs AVX512_BF16 or AMX; on a CPU without either the provider computes in f32, with a warning.
    """
    if OPENVINO not in ort.get_available_providers():
        raise DeviceError(
            f"DEVICE=openvino, but this ONNX Runtime ({_build_name(ort)}) has no OpenVINO execution provider: "
            + _OPENVINO_INSTALL_HINT
        )
    flags = cpu_flags if cpu_flags is not None else _cpu_flags()
    if precision == "bf16" and not flags & set(BF16_CPU_FLAGS):
        logger.warning(
            "OPENVINO_PRECISION=bf16, but this CPU has neither %s: OpenVINO computes in f32", " nor ".join(BF16_CPU_FLAGS)
        )
        precision = "f32"
    options = {"device_type": "CPU", "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": precision}})}
    if threads:
        options["num_of_threads"] = str(threads)
    failure = _probe(ort, (OPENVINO, options))
    if failure is not None:
        raise DeviceError(f"DEVICE=openvino, but OpenVINO cannot be used: {failure}")
    logger.info("DEVICE=openvino: ONNX Runtime's OpenVINO execution provider runs the models on the CPU in %s", precision)
    return OPENVINO, options


def _cpu_flags() -> set[str]:
    """The CPU's feature flags, named as Linux lists them (segnext_backend/cpu.py asks the CPU itself)."""
    return cpu_flags()


def _probe(ort, provider=CUDA) -> str | None:
    """Run a one-node model on [provider, CPU]; None when the provider ran it, else what happened instead."""
    name = provider if isinstance(provider, str) else provider[0]
    try:
        session = ort.InferenceSession(_probe_model(), providers=[provider, CPU])
        active = session.get_providers()
        if name in active:
            session.run(None, {"x": np.arange(4, dtype=np.float32)})
            return None
    except Exception as error:  # noqa: BLE001  (ONNX Runtime raises its own types, e.g. when CUDA_PATH is set)
        return f"ONNX Runtime could not start its {name} ({type(error).__name__}: {error})"
    return f"ONNX Runtime started {', '.join(active)} instead of {name}"


def _probe_model() -> bytes:
    """y = x + x on a float vector: the smallest model that makes a session run a kernel."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "device_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # read by every ONNX Runtime this project supports
    return model.SerializeToString()


def driver_problem() -> str | None:
    """Whether the NVIDIA driver loads and sees a GPU (Linux; elsewhere nothing is checked)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        return f"no NVIDIA driver ({error}); in Docker, run the container with --gpus all (NVIDIA container toolkit)"
    status = libcuda.cuInit(0)
    if status != 0:
        return f"the NVIDIA driver does not start: cuInit returned {_cuda_error_name(libcuda, status)}"
    count = ctypes.c_int(0)
    status = libcuda.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return f"the NVIDIA driver cannot count its GPUs: cuDeviceGetCount returned {_cuda_error_name(libcuda, status)}"
    if count.value == 0:
        return "the NVIDIA driver sees no GPU (check CUDA_VISIBLE_DEVICES, or docker run --gpus)"
    return None


def _cuda_error_name(libcuda, status: int) -> str:
    name = ctypes.c_char_p()
    if libcuda.cuGetErrorName(status, ctypes.byref(name)) == 0 and name.value:
        return f"{name.value.decode()} ({status})"
    return str(status)


def provider_library_problem(ort) -> str | None:
    """Whether ONNX Runtime's CUDA provider library loads; the loader's message names a missing dependency."""
    capi = Path(ort.__file__).parent / "capi"
    libraries = sorted(capi.glob("libonnxruntime_providers_cuda.so*")) + sorted(capi.glob("onnxruntime_providers_cuda.dll"))
    if not libraries:
        return f"{capi} has no CUDA provider library"
    try:
        ctypes.CDLL(str(libraries[0]))  # loaded as ONNX Runtime loads it (symbols resolved now)
    except OSError as error:
        if "libcuda.so" in str(error):  # the driver's own library: driver_problem names it
            return None
        return f"ONNX Runtime's CUDA provider library does not load ({error}): {_GPU_INSTALL_HINT}"
    return None


def _build_name(ort) -> str:
    from importlib import metadata

    for distribution in ("onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime"):
        try:
            return f"{distribution} {metadata.version(distribution)}"
        except metadata.PackageNotFoundError:
            continue
    return f"onnxruntime {getattr(ort, '__version__', '?')}"
