"""What this x86 CPU can do for the models: its class, and whether its int8 products saturate.

ONNX Runtime's CPU kernels multiply uint8 activations by int8 weights with the instruction the CPU has:

- with VNNI (AVX512_VNNI, AVX-VNNI or AMX-INT8), `vpdpbusd`/AMX add each product into 32 bits: exact;
- without it (AVX2, or AVX-512 before Cascade Lake), `vpmaddubsw` adds each pair of products into 16 bits and
  *saturates*: 255 x 127 x 2 = 64,770 is past 32,767, so layers whose activations and weights both use their
  whole range give wrong sums. ONNX Runtime's quantiser documents this and its `reduce_range` (7-bit weights:
  255 x 64 x 2 = 32,640 fits) for such CPUs.

bfloat16 (what `DEVICE=openvino` computes in by default) runs at twice float32's rate with AVX512_BF16 or AMX;
without them OpenVINO computes in f32.
"""

from __future__ import annotations

from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo names
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# The CPU classes, slowest first, as tools.quantize --target-cpu and the README's table name them.
CPU_CLASSES = ("avx2", "avx512", "avx512-vnni", "avx512-bf16")


# numpy's CPUID names -> Linux's. numpy asks the CPU itself (CPUID), as ONNX Runtime's kernels do, on every OS;
# it knows no AMX or AVX-VNNI, whose CPUs then count as having no VNNI (7-bit int8 weights: right, a bit less close).
_NUMPY_FLAG_NAMES = {
    "AVX2": "avx2", "FMA3": "fma", "AVX512F": "avx512f", "AVX512BW": "avx512bw",
    "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16",
}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags, named as Linux's /proc/cpuinfo names them: those of `cpuinfo` (that file's
    text) when given, else what the CPU says (CPUID, through numpy), else /proc/cpuinfo's; empty when none tells."""
    if cpuinfo is None:
        features = _numpy_cpu_features()
        if features:
            return {name for numpy_name, name in _NUMPY_FLAG_NAMES.items() if features.get(numpy_name)}
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def _numpy_cpu_features() -> dict:
    """numpy's run-time CPU dispatch table (CPUID): {"AVX2": True, ...}; empty where this numpy has none."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # numpy >= 2
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__  # numpy 1.x
        except ImportError:
            return {}
    return dict(__cpu_features__)


def has_vnni(flags: set[str]) -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels add products in 32 bits (exact) on a CPU with these flags."""
    return bool(flags & set(VNNI_FLAGS))


def cpu_class(flags: set[str]) -> str | None:
    """One of CPU_CLASSES for these flags; None when they are unknown or below AVX2 (another OS, an old CPU).

    AVX-VNNI (Intel's 256-bit VNNI, Alder Lake and later) counts as `avx512-vnni`: for int8 what matters is
    the exact 32-bit sums; AMX counts as `avx512-bf16`."""
    if flags & set(BF16_FLAGS):
        return "avx512-bf16"
    if has_vnni(flags):
        return "avx512-vnni"
    if "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return None


def int8_saturates(target: str) -> bool:
    """Whether uint8 x int8 (8-bit weights) saturates on a CPU of class `target`."""
    if target not in CPU_CLASSES:
        raise ValueError(f"unknown CPU class {target!r}; one of {', '.join(CPU_CLASSES)}")
    return target in ("avx2", "avx512")


# tools.quantize writes, into each int8 file's metadata, the CPU class it was made for, its weights' bits and
# its recipe (JSON), so that the backend can say whether the file is exact on the CPU that serves it.
INT8_METADATA_KEY = "segnext_backend.int8"


def int8_file_status(metadata: str | None, flags: set[str]) -> dict | None:
    """What an int8 file (its INT8_METADATA_KEY value) means on a CPU with these flags, for /health and the log;
    None for a file without that metadata (float32, or int8 made by another tool)."""
    import json

    if not metadata:
        return None
    made = json.loads(metadata)
    here = cpu_class(flags)
    weight_bits = int(made.get("weight_bits", 8))
    # 7-bit weights never saturate; 8-bit ones are exact only where the CPU adds the products in 32 bits.
    exact = weight_bits <= 7 or has_vnni(flags)
    if exact:
        why = f"{weight_bits}-bit weights " + (
            "never saturate" if weight_bits <= 7 else "are exact with this CPU's VNNI"
        )
    else:
        why = (
            f"this CPU ({here or 'unknown'}) has no VNNI: its uint8 x int8 products saturate with 8-bit weights; "
            "rebuild the pair with `python -m tools.quantize MODEL_DIR --out OUT_DIR` on it (or --target-cpu avx2)"
        )
    return {
        "made_for": made.get("target_cpu"), "recipe": made.get("recipe"), "weight_bits": weight_bits,
        "this_cpu": here, "exact_here": exact, "why": why,
    }
