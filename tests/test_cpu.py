"""segnext_backend/cpu.py: the CPU class from its flags, and what an int8 file means on the CPU that serves it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segnext_backend.cpu import cpu_class, cpu_flags, int8_file_status, int8_saturates  # noqa: E402


def _cpuinfo(flags: str) -> str:
    return f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 ssse3 {flags}\nbogomips\t: 4792.78\n"


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("avx avx2 fma bmi2", "avx2"),  # AMD EPYC Zen 2/3, Intel Haswell-Broadwell
        ("avx avx2 fma avx512f avx512bw avx512vl", "avx512"),  # Intel Skylake-SP: AVX-512 without VNNI
        ("avx avx2 fma avx512f avx512bw avx512_vnni", "avx512-vnni"),  # Intel Cascade Lake
        ("avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16", "avx512-bf16"),  # AMD Zen 4, Intel Cooper Lake
        ("avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_int8 amx_tile", "avx512-bf16"),  # Sapphire Rapids
        ("avx sse4_2", None),  # below AVX2: the project does not support it
    ],
)
def test_cpu_class_from_proc_cpuinfo_flags(flags, expected):
    assert cpu_class(cpu_flags(_cpuinfo(flags))) == expected


def test_int8_saturates_exactly_on_the_classes_without_vnni():
    assert [int8_saturates(c) for c in ("avx2", "avx512", "avx512-vnni", "avx512-bf16")] == [True, True, False, False]
    with pytest.raises(ValueError, match="unknown CPU class"):
        int8_saturates("sse4")


def test_an_8_bit_int8_file_is_flagged_on_a_cpu_without_vnni_and_a_7_bit_one_is_not():
    avx2, vnni = cpu_flags(_cpuinfo("avx2 fma")), cpu_flags(_cpuinfo("avx2 avx512bw avx512_vnni"))
    eight = json.dumps({"target_cpu": "avx512-vnni", "weight_bits": 8})
    seven = json.dumps({"target_cpu": "avx2", "weight_bits": 7})
    status = int8_file_status(eight, avx2)
    assert status["exact_here"] is False and status["this_cpu"] == "avx2" and "--target-cpu avx2" in status["why"]
    assert int8_file_status(eight, vnni)["exact_here"] is True
    assert int8_file_status(seven, avx2)["exact_here"] is True
    assert int8_file_status(None, avx2) is None  # float32, or int8 from another tool: nothing claimed


def test_this_cpus_class_from_cpuid_is_the_one_proc_cpuinfo_gives():
    """cpu_flags() asks the CPU (CPUID, through numpy), as ONNX Runtime's kernels do; Linux's list must agree.
    (Not under user-mode emulation, qemu-x86_64 -cpu ..., where /proc/cpuinfo is the host's and CPUID the
    emulated CPU's: that is why cpu_flags() asks CPUID.)"""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this OS")
    assert cpu_class(cpu_flags()) == cpu_class(cpu_flags(cpuinfo.read_text()))
    assert cpu_class(cpu_flags()) is not None  # the project supports AVX2 and up
