"""What this CPU can do, asked once per process: the one place that looks at the processor.

Kernel choices (``voxcpm_core.cpu.kernels``), training precision and the benches ask ``cpu()``; none of
them reads /proc/cpuinfo or probes oneDNN themselves. Caps set in the environment count as limits of the
machine, so a machine with AVX-512 run with

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

takes the same paths as an AVX2-only one (``.ci/run`` does this for the kernel, precision and bench tests).
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# /proc/cpuinfo flags worth reporting; the bf16 ones mean bfloat16 dot products in hardware
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "bf16")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 flags / Arm feature
CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
# oneDNN ISA names (lower case) at or above which it runs bfloat16 natively
ONEDNN_BF16_ISAS = frozenset({"avx512_core_bf16", "avx512_core_fp16", "avx512_core_amx", "avx512_core_amx_fp16",
                              "avx10_1_512", "avx10_1_512_amx", "avx10_1_512_amx_fp16", "avx10_2_512",
                              "avx10_2_512_amx_2", "all"})


@dataclass(frozen=True)
class CpuCapability:
    machine: str  # platform.machine(): x86_64, aarch64, ...
    isa: str  # the level torch's own kernels dispatch to: DEFAULT, AVX2, AVX512, ... (after ATEN_CPU_CAPABILITY)
    flags: tuple[str, ...]  # the REPORTED_FLAGS this CPU has
    caps: dict[str, str]  # the CAP_VARIABLES set in the environment
    onednn: bool  # torch has oneDNN linear kernels
    onednn_bf16: bool  # oneDNN runs a bfloat16 linear here (natively or emulated with AVX-512), probed
    native_bf16: bool  # bfloat16 dot products in hardware, not capped away: bf16 matmuls beat float32

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        capped = ", ".join(f"{k}={v}" for k, v in self.caps.items())
        return f"{self.machine} {self.isa}" + (" with native bf16" if self.native_bf16 else "") + (
            f" (capped: {capped})" if capped else "")


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: report none and take the paths that always work
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN creates a linear primitive for ``dtype`` here: torch's own check ignores oneDNN's ISA cap,
    and a refused primitive is a RuntimeError at the first call, so try one tiny product."""
    try:
        x = torch.ones(2, 8, dtype=dtype)
        torch.ops.mkldnn._linear_pointwise(x, torch.ones(4, 8, dtype=dtype), None, "none", [None], "")
    except RuntimeError:
        return False
    return True


def _onednn_cap() -> str | None:
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().lower() if value else None


@functools.cache
def cpu() -> CpuCapability:
    """This process's CPU capability (cached: the caps are read by torch and oneDNN at start-up too)."""
    flags = _cpu_flags()
    onednn = _onednn_linear_available()
    cap = _onednn_cap()
    native = bool(flags & NATIVE_BF16_FLAGS) and (cap is None or cap in ONEDNN_BF16_ISAS)
    return CpuCapability(
        machine=platform.machine(),
        isa=torch.backends.cpu.get_cpu_capability(),
        flags=tuple(f for f in REPORTED_FLAGS if f in flags),
        caps={k: os.environ[k] for k in CAP_VARIABLES if os.environ.get(k)},
        onednn=onednn,
        onednn_bf16=onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported() and _onednn_runs(torch.bfloat16),
        native_bf16=native,
    )


def bf16_emulation_notice(setting: str) -> str | None:
    """One line for a user who asked for bfloat16 (``setting``, e.g. "precision: bf16") on this CPU, or None
    where bf16 is native. Without native bf16 dot products torch still computes bf16 with float32
    accumulation (same numerics), only slower."""
    if cpu().native_bf16:
        return None
    return (f"{setting}: this CPU ({cpu().describe()}) has no native bfloat16 instructions, so bfloat16 is "
            "emulated (same numerics) and may be slower than float32")
