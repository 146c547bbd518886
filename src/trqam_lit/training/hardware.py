"""What the CPU can do natively, for the reduced-precision options (docs/performance.md, "Reduced precision")."""

from __future__ import annotations

import platform

import torch


def _cpu_flag(name: str) -> bool:
    check = getattr(torch.cpu, name, None)  # private torch.cpu helpers (cpuinfo); absent on some builds
    return bool(check()) if check is not None else False


def cpu_has_bf16_gemm() -> bool:
    """Whether bf16 GEMMs run natively on this CPU (x86: AVX512-BF16 or AMX; other architectures are not checked and
    count as native). Without it (e.g. an AVX2-only x86 CPU) oneDNN emulates them, measured 8x slower than float32,
    so ``precision=bf16-mixed`` on CPU is then a slowdown."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return _cpu_flag("_is_avx512_bf16_supported") or _cpu_flag("_is_amx_tile_supported")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, which oneDNN's bf16 math mode for float32 matmuls needs to be faster (on an
    AVX512-BF16 CPU without AMX the mode changed nothing: the same float32 kernel, float32 rounding)."""
    return _cpu_flag("_is_amx_tile_supported")
