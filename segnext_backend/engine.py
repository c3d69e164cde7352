"""The two ONNX Runtime sessions and their contract.

`encode` and `decode` are pure functions of their inputs, like SAM's image encoder and mask decoder: all
caching and click bookkeeping lives in `segmenter.py`. The interface is checked when the files are loaded, so
that a wrong file fails at start with a message naming what differs, not at the first click.

Image features are returned as an ONNX Runtime `OrtValue` that lives where the decoder reads them
(`feature_device`): on the GPU under the CUDA execution provider, so that a click copies only its clicks and
the 4 MB `prev_mask` to the device and the 4 MB logits back, never the 12.6 MB of features. On the CPU the
same code runs with the features in host memory, which is how the tests exercise it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .cpu import INT8_METADATA_KEY, cpu_flags, int8_file_status
from .geometry import MODEL_SIZE

logger = logging.getLogger(__name__)

FEATURE_SHAPE = (1, 768, 64, 64)
FEATURE_BYTES = int(np.prod(FEATURE_SHAPE)) * 4  # float32
TEST_MODEL_METADATA_KEY = "segnext_backend.test_model"

# name -> shape; a str is a dynamic dimension (any name, or none, is accepted there).
ENCODER_INPUTS = {"image": (1, 3, MODEL_SIZE, MODEL_SIZE)}
ENCODER_OUTPUTS = {"image_feats": FEATURE_SHAPE}
DECODER_INPUTS = {
    "image_feats": FEATURE_SHAPE,
    "point_coords": (1, "num_points", 2),
    "point_labels": (1, "num_points"),
    "prev_mask": (1, 1, MODEL_SIZE, MODEL_SIZE),
}
DECODER_OUTPUTS = {"mask": (1, 1, MODEL_SIZE, MODEL_SIZE)}


class ModelInterfaceError(RuntimeError):
    """An ONNX file does not have SegNext's interface; the message names every difference."""


def _shape_matches(actual, expected) -> bool:
    if len(actual) != len(expected):
        return False
    # A dynamic dimension (a str here) accepts any declared value; a fixed one must be declared as itself.
    return all(isinstance(want, str) or got == want for got, want in zip(actual, expected))


def check_interface(session: ort.InferenceSession, name: str, inputs: dict, outputs: dict) -> None:
    problems = []
    for kind, declared, expected in (
        ("input", session.get_inputs(), inputs),
        ("output", session.get_outputs(), outputs),
    ):
        by_name = {arg.name: arg for arg in declared}
        for arg_name, shape in expected.items():
            arg = by_name.get(arg_name)
            if arg is None:
                problems.append(f"missing {kind} '{arg_name}' (it has {sorted(by_name)})")
                continue
            if arg.type != "tensor(float)":
                problems.append(f"{kind} '{arg_name}' is {arg.type}, expected tensor(float)")
            if not _shape_matches(list(arg.shape), shape):
                problems.append(f"{kind} '{arg_name}' has shape {list(arg.shape)}, expected {list(shape)}")
        extra = sorted(set(by_name) - set(expected))
        if extra and kind == "input":
            problems.append(f"unexpected {kind}s {extra}")
    if problems:
        raise ModelInterfaceError(f"{name} does not have SegNext's interface: " + "; ".join(problems))


@dataclass(frozen=True)
class ModelFileInfo:
    path: str
    size_bytes: int
    is_test_model: bool
    # An int8 file from tools.quantize: the CPU class it was made for, and whether it is exact on this CPU.
    int8: dict | None = None


def _session_options(intra_op_threads: int, memory_arena: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # 0 lets ONNX Runtime use one thread per physical core, its own default (on 2 cores: 2x faster than 1).
    options.intra_op_num_threads = intra_op_threads
    # ENABLE_ALL (fusions, NCHWc layouts) is the fastest level measured (docs/performance.md): encoder ~13 %
    # and decoder ~7 % faster than DISABLE_ALL, logits within 1e-6 of the unoptimised graph.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The CPU arena keeps the largest run's buffers for the next run: faster, but never given back.
    options.enable_cpu_mem_arena = memory_arena
    return options


def _load(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own exception types for corrupt files
        raise ModelInterfaceError(f"{path} could not be loaded by ONNX Runtime: {error}") from None


def feature_device(active_providers: list[str]) -> str:
    """Where a session with these (active, in priority order) providers wants its inputs: "cuda" or "cpu"."""
    return "cuda" if active_providers and active_providers[0] == "CUDAExecutionProvider" else "cpu"


def openvino_precision(provider: str, options: dict) -> str | None:
    """What OpenVINO computes in ("bf16", "f32") when it runs the session; None under another provider."""
    if provider != "OpenVINOExecutionProvider":
        return None
    return json.loads(options.get("load_config") or "{}").get("CPU", {}).get("INFERENCE_PRECISION_HINT", "f32")


class SegNextEngine:
    def __init__(
        self,
        encoder_path: Path,
        decoder_path: Path,
        *,
        intra_op_threads: int = 0,
        max_concurrent_decodes: int = 1,
        providers: list | None = None,  # names, or (name, options) pairs: as ONNX Runtime takes them
        encoder_memory_arena: bool = False,
        decoder_memory_arena: bool = True,
    ):
        """`encoder_memory_arena` / `decoder_memory_arena`: ONNX Runtime's CPU memory arena per session.

        Measured on SegNext-sized models (docs/performance.md): the encoder's arena keeps ~2.4 GB resident
        between encodes to save ~5-10 % of an encode that mostly runs in the background, so it is off by
        default; the decoder's arena (~2.2 GB) makes each click ~20 % faster, so it is on.
        """
        providers = providers or ["CPUExecutionProvider"]
        # A provider is a name, or (name, options) as ONNX Runtime accepts it (device.py builds OpenVINO's so).
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        wanted_options = {} if isinstance(providers[0], str) else providers[0][1]
        self.encoder = _load(Path(encoder_path), _session_options(intra_op_threads, encoder_memory_arena), providers)
        check_interface(self.encoder, str(encoder_path), ENCODER_INPUTS, ENCODER_OUTPUTS)
        self.decoder = _load(Path(decoder_path), _session_options(intra_op_threads, decoder_memory_arena), providers)
        check_interface(self.decoder, str(decoder_path), DECODER_INPUTS, DECODER_OUTPUTS)
        # The providers that really run the models: ONNX Runtime falls back to the CPU quietly when CUDA or OpenVINO
        # cannot start (device.py checks before loading; this is what /health reports).
        self.execution_providers = self.decoder.get_providers()
        if wanted not in self.execution_providers:
            logger.warning("%s could not be started; running on %s", wanted, ", ".join(self.execution_providers))
        self.openvino_precision = openvino_precision(
            self.execution_providers[0], wanted_options if wanted in self.execution_providers else {}
        )
        self.feature_device = feature_device(self.execution_providers)
        logger.info(
            "execution provider: %s%s (image features on %s)",
            self.execution_providers[0],
            f", computing in {self.openvino_precision}" if self.openvino_precision else "",
            self.feature_device,
        )
        self.files = {
            role: ModelFileInfo(
                path=str(path),
                size_bytes=Path(path).stat().st_size,
                is_test_model=session.get_modelmeta().custom_metadata_map.get(TEST_MODEL_METADATA_KEY) == "true",
                int8=int8_file_status(session.get_modelmeta().custom_metadata_map.get(INT8_METADATA_KEY), cpu_flags())
                if self.execution_providers[0] == "CPUExecutionProvider"
                else None,
            )
            for role, path, session in (("encoder", encoder_path, self.encoder), ("decoder", decoder_path, self.decoder))
        }
        for role, info in self.files.items():
            if info.int8 is not None:
                logger.log(
                    logging.INFO if info.int8["exact_here"] else logging.WARNING,
                    "%s: int8 (%s recipe) made for %s CPUs: %s",
                    role, info.int8["recipe"] or "unnamed", info.int8["made_for"], info.int8["why"],
                )
        # Each SegNext run holds about a gigabyte of attention maps: these bound how many go at once.
        # One encode at a time keeps a burst of newly opened tasks from starving the clicks of memory.
        self._encode_slots = threading.Semaphore(1)
        self._decode_slots = threading.Semaphore(max_concurrent_decodes)
        # This process's totals, for /metrics: with shared features and states they show the fleet sharing.
        self.encoder_runs = 0
        self.decoder_runs = 0
        self._runs_lock = threading.Lock()

    @property
    def is_test_model(self) -> bool:
        return any(info.is_test_model for info in self.files.values())

    def encode(self, model_input: np.ndarray) -> ort.OrtValue:
        """1x3x1024x1024 float32 RGB in [0, 1] -> 1x768x64x64 image features, on `feature_device`."""
        if model_input.shape != ENCODER_INPUTS["image"] or model_input.dtype != np.float32:
            raise ValueError(f"encoder input must be float32 {ENCODER_INPUTS['image']}, got {model_input.dtype} {model_input.shape}")
        with self._encode_slots:
            # Allocated here rather than by the session: the session's arena would keep an evicted image's
            # features reserved, while this is given back to the device when the cache drops it.
            features = ort.OrtValue.ortvalue_from_shape_and_type(FEATURE_SHAPE, np.float32, self.feature_device, 0)
            binding = self.encoder.io_binding()
            binding.bind_cpu_input("image", np.ascontiguousarray(model_input))
            binding.bind_ortvalue_output("image_feats", features)
            self.encoder.run_with_iobinding(binding)
        with self._runs_lock:
            self.encoder_runs += 1
        return features

    def features_from_numpy(self, features: np.ndarray) -> ort.OrtValue:
        """Host features (e.g. read from the disk cache) -> features on `feature_device`, as `encode` returns."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.shape != FEATURE_SHAPE:
            raise ValueError(f"features must be {FEATURE_SHAPE}, got {features.shape}")
        # A copy that ONNX Runtime owns: `ortvalue_from_numpy` would only borrow the array's memory on the CPU,
        # and a `.numpy()` view of it would then outlive the array (a use after free, measured: a segfault).
        on_device = ort.OrtValue.ortvalue_from_shape_and_type(FEATURE_SHAPE, np.float32, self.feature_device, 0)
        on_device.update_inplace(features)
        return on_device

    def decode(
        self,
        features: ort.OrtValue | np.ndarray,
        point_coords: np.ndarray,
        point_labels: np.ndarray,
        prev_mask: np.ndarray,
    ) -> np.ndarray:
        """Features, Nx2 clicks (x, y in the model frame), N labels (1/0), 1024x1024 prev probability -> logits.

        Returns the 1024x1024 float32 logits, in host memory.
        """
        if isinstance(features, np.ndarray):
            features = self.features_from_numpy(features)
        coords = np.ascontiguousarray(point_coords, dtype=np.float32).reshape(1, -1, 2)
        labels = np.ascontiguousarray(point_labels, dtype=np.float32).reshape(1, -1)
        prev = np.ascontiguousarray(prev_mask, dtype=np.float32).reshape(1, 1, MODEL_SIZE, MODEL_SIZE)
        if coords.shape[1] != labels.shape[1] or coords.shape[1] == 0:
            raise ValueError(f"need as many labels as clicks, and at least one: {coords.shape} vs {labels.shape}")
        with self._decode_slots:
            binding = self.decoder.io_binding()
            binding.bind_ortvalue_input("image_feats", features)
            binding.bind_cpu_input("point_coords", coords)
            binding.bind_cpu_input("point_labels", labels)
            binding.bind_cpu_input("prev_mask", prev)
            binding.bind_output("mask", "cpu")  # the mask is resized and thresholded on the host
            self.decoder.run_with_iobinding(binding)
            (logits,) = binding.get_outputs()
        with self._runs_lock:
            self.decoder_runs += 1
        return logits.numpy()[0, 0]
