"""DEVICE=cpu|cuda|auto|openvino (segnext_backend/device.py), against a stand-in onnxruntime module that plays
each way a GPU or OpenVINO set-up can fail: no such provider in the build, libraries that preload_dlls cannot
load, a session that falls back to the CPU quietly, a session that raises. tests/test_gpu_build.py and
tests/test_openvino_build.py run the real builds."""

from __future__ import annotations

import json
import logging

import pytest

from segnext_backend import device
from segnext_backend.device import CPU, CUDA, OPENVINO, DeviceError, choose_execution_providers, openvino_provider
from segnext_backend.settings import Settings, SettingsError


class FakeSession:
    def __init__(self, fake, model, providers):
        fake.calls.append(("session", list(providers)))
        if fake.session_error:
            raise fake.session_error
        names = [p if isinstance(p, str) else p[0] for p in providers]  # a name, or (name, options)
        self.providers = [name for name in names if name in fake.working]
        self.fake = fake

    def get_providers(self):
        return self.providers

    def run(self, outputs, feeds):
        self.fake.calls.append(("run", self.providers[0]))
        return [feeds["x"] * 2]


class FakeOnnxRuntime:
    """The parts of onnxruntime that device.py uses; `working`: the providers a session really starts."""

    __file__ = "/nowhere/onnxruntime/__init__.py"
    __version__ = "0.0-fake"

    def __init__(self, available, working, preload_prints="", session_error=None, has_preload=True):
        self.available = available
        self.working = working
        self.preload_prints = preload_prints
        self.session_error = session_error
        self.calls = []
        if has_preload:
            self.preload_dlls = self._preload_dlls

    def get_available_providers(self):
        return list(self.available)

    def _preload_dlls(self):
        self.calls.append(("preload",))
        print(self.preload_prints, end="")

    def InferenceSession(self, model, providers):  # noqa: N802  (onnxruntime's name)
        return FakeSession(self, model, providers)


@pytest.fixture
def no_driver(monkeypatch):
    """This machine as device.py sees it: no NVIDIA driver, and the provider library misses cuBLAS."""
    monkeypatch.setattr(device, "driver_problem", lambda: "no NVIDIA driver: libcuda.so.1 cannot be loaded")
    monkeypatch.setattr(
        device, "provider_library_problem", lambda ort: "a CUDA or cuDNN library is missing: libcublasLt.so.13"
    )


CPU_BUILD = dict(available=[CPU], working=[CPU])
GPU_BUILD_NO_GPU = dict(available=[CUDA, CPU], working=[CPU])  # onnxruntime-gpu falls back quietly
GPU_BUILD_WITH_GPU = dict(available=[CUDA, CPU], working=[CUDA, CPU])


def test_cpu_never_touches_onnxruntime():
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"DEVICE=cpu used onnxruntime.{name}")

    assert choose_execution_providers("cpu", Untouchable()) == [CPU]


def test_a_working_gpu_is_chosen_after_the_libraries_are_preloaded():
    fake = FakeOnnxRuntime(**GPU_BUILD_WITH_GPU)
    for setting in ("cuda", "auto"):
        fake.calls.clear()
        assert choose_execution_providers(setting, fake) == [CUDA, CPU]
        # preload_dlls before any session: the CUDA provider's library finds its libraries only then.
        assert fake.calls == [("preload",), ("session", [CUDA, CPU]), ("run", CUDA)]


def test_cuda_on_a_cpu_build_refuses_and_says_what_to_install():
    with pytest.raises(DeviceError) as refused:
        choose_execution_providers("cuda", FakeOnnxRuntime(**CPU_BUILD))
    message = str(refused.value)
    assert "no CUDA execution provider" in message and "onnxruntime-gpu" in message and "requirements-gpu.txt" in message


def test_auto_on_a_cpu_build_runs_on_the_cpu_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="segnext_backend.device"):
        assert choose_execution_providers("auto", FakeOnnxRuntime(**CPU_BUILD)) == [CPU]
    assert "running on the CPU" in caplog.text and "no CUDA execution provider" in caplog.text


def test_a_quiet_fallback_is_caught_and_cuda_refuses_naming_driver_and_library(no_driver):
    fake = FakeOnnxRuntime(**GPU_BUILD_NO_GPU, preload_prints="Failed to load libcudnn.so.9: cannot open shared object file\n")
    with pytest.raises(DeviceError) as refused:
        choose_execution_providers("cuda", fake)
    message = str(refused.value)
    assert ("preload",) in fake.calls
    assert "no NVIDIA driver" in message  # the driver
    assert "libcublasLt.so.13" in message  # the provider library's missing dependency
    assert "libcudnn.so.9" in message  # what preload_dlls could not load
    assert f"started {CPU} instead of {CUDA}" in message  # the session's active providers


def test_auto_with_a_quiet_fallback_runs_on_the_cpu_and_says_why(no_driver, caplog):
    with caplog.at_level(logging.WARNING, logger="segnext_backend.device"):
        assert choose_execution_providers("auto", FakeOnnxRuntime(**GPU_BUILD_NO_GPU)) == [CPU]
    assert "DEVICE=auto: running on the CPU" in caplog.text and "no NVIDIA driver" in caplog.text


def test_a_session_that_raises_is_reported_not_propagated(no_driver):
    fake = FakeOnnxRuntime(**GPU_BUILD_NO_GPU, session_error=RuntimeError("CUDA failure 100: no CUDA-capable device"))
    with pytest.raises(DeviceError, match="no CUDA-capable device"):
        choose_execution_providers("cuda", fake)
    assert choose_execution_providers("auto", fake) == [CPU]


def test_an_old_gpu_build_without_preload_still_gets_its_probe(caplog):
    fake = FakeOnnxRuntime(**GPU_BUILD_WITH_GPU, has_preload=False)
    with caplog.at_level(logging.WARNING, logger="segnext_backend.device"):
        assert choose_execution_providers("cuda", fake) == [CUDA, CPU]
    assert "no preload_dlls" in caplog.text


def test_the_probe_model_runs_on_the_real_cpu_build():
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(device._probe_model(), providers=[CPU])
    (y,) = session.run(None, {"x": np.arange(4, dtype=np.float32)})
    assert y.tolist() == [0.0, 2.0, 4.0, 6.0]


def test_the_device_setting_takes_cpu_cuda_auto_and_openvino_only():
    for value in ("cpu", "cuda", "auto", " AUTO ", "openvino"):
        assert Settings.from_env({"DEVICE": value}).device == value.strip().lower()
    with pytest.raises(SettingsError, match="DEVICE='gpu' must be cpu, cuda, auto or openvino"):
        Settings.from_env({"DEVICE": "gpu"})
    assert Settings().device == "cpu"


def test_health_names_the_active_execution_provider(make_client):
    client, _ = make_client(device="auto")
    health = client.get("/health").get_json()
    assert health["device"] == "auto" and health["execution_provider"] == CPU
    assert health["openvino_precision"] is None


def test_the_driver_check_on_a_machine_without_a_driver():
    import ctypes.util

    if ctypes.util.find_library("cuda"):
        pytest.skip("this machine has an NVIDIA driver")
    assert device.driver_problem().startswith("no NVIDIA driver (libcuda.so.1")


def test_the_provider_library_check_names_a_missing_cuda_library_but_leaves_the_driver_to_the_driver_check(
    tmp_path, monkeypatch
):
    capi = tmp_path / "onnxruntime" / "capi"
    capi.mkdir(parents=True)
    (capi / "libonnxruntime_providers_cuda.so").write_bytes(b"")
    fake = FakeOnnxRuntime(**GPU_BUILD_NO_GPU)
    fake.__file__ = str(tmp_path / "onnxruntime" / "__init__.py")
    loader_says = {}

    def cdll(path):
        assert path == str(capi / "libonnxruntime_providers_cuda.so")
        raise OSError(loader_says["error"])

    monkeypatch.setattr(device.ctypes, "CDLL", cdll)
    loader_says["error"] = "libcublasLt.so.13: cannot open shared object file: No such file or directory"
    problem = device.provider_library_problem(fake)
    assert "libcublasLt.so.13: cannot open shared object file" in problem and "requirements-gpu.txt" in problem
    # The GPU image without --gpus: every CUDA library is there but the driver's; no advice to reinstall.
    loader_says["error"] = "libcuda.so.1: cannot open shared object file: No such file or directory"
    assert device.provider_library_problem(fake) is None


OPENVINO_BUILD = dict(available=[OPENVINO, CPU], working=[OPENVINO, CPU])


def test_openvino_computes_in_bf16_where_the_cpu_has_it():
    fake = FakeOnnxRuntime(**OPENVINO_BUILD)
    name, options = openvino_provider(fake, "bf16", threads=2, cpu_flags={"avx512f", "avx512_bf16"})
    assert name == OPENVINO
    assert json.loads(options["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}
    assert options["device_type"] == "CPU" and options["num_of_threads"] == "2"
    assert ("run", OPENVINO) in fake.calls  # probed before the real models load
    _, options = openvino_provider(fake, "f32", cpu_flags={"amx_bf16"})
    assert json.loads(options["load_config"])["CPU"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert "num_of_threads" not in options  # 0: OpenVINO's own default


def test_openvino_bf16_on_a_cpu_without_it_computes_in_f32_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        _, options = openvino_provider(FakeOnnxRuntime(**OPENVINO_BUILD), "bf16", cpu_flags={"avx2", "avx512f"})
    assert json.loads(options["load_config"])["CPU"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert "neither avx512_bf16 nor amx_bf16: OpenVINO computes in f32" in caplog.text


def test_openvino_refuses_without_the_openvino_build_or_when_it_falls_back():
    with pytest.raises(DeviceError, match="no OpenVINO execution provider.*requirements-openvino.txt"):
        choose_execution_providers("openvino", FakeOnnxRuntime(**CPU_BUILD))
    quiet_fallback = FakeOnnxRuntime(available=[OPENVINO, CPU], working=[CPU])
    with pytest.raises(DeviceError, match=f"started {CPU} instead of {OPENVINO}"):
        choose_execution_providers("openvino", quiet_fallback)
    providers = choose_execution_providers("openvino", FakeOnnxRuntime(**OPENVINO_BUILD), openvino_precision="f32")
    assert [p if isinstance(p, str) else p[0] for p in providers] == [OPENVINO, CPU]


def test_openvino_precision_setting():
    assert Settings.from_env({}).openvino_precision == "bf16"
    assert Settings.from_env({"OPENVINO_PRECISION": "F32", "DEVICE": "openvino"}).openvino_precision == "f32"
    with pytest.raises(SettingsError, match="OPENVINO_PRECISION='fp8' must be bf16 or f32"):
        Settings.from_env({"OPENVINO_PRECISION": "fp8"})
