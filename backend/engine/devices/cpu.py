"""What the CPU offers the device policy: its feature flags, whether it computes bfloat16 in hardware,
a one-line description for the logs, and a scope with a chosen number of intra-op threads."""
from __future__ import annotations

import contextlib
import os

import torch


def _cpuinfo_field(*keys: str) -> str | None:
    """The first /proc/cpuinfo line's value for one of `keys` (None where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo_field("flags", "Features") or "").split())


def cpu_model_name() -> str:
    """The CPU's model name ("AMD EPYC 9B45", ...), as /proc/cpuinfo or the platform gives it."""
    import platform
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_bf16_supported() -> bool:
    """True when the CPU computes bfloat16 in hardware (AVX512-BF16 or AMX on x86, BF16 on Arm)."""
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    flags = cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags or ("bf16" in flags and os.uname().machine in ("aarch64", "arm64")):
        return True
    if flags or checker is None:
        return False
    try:  # no /proc/cpuinfo: ask oneDNN (it also says yes for plain AVX512, so only as a fallback)
        return bool(checker()) and torch.backends.cpu.get_cpu_capability() != "AVX2"
    except Exception:  # noqa: BLE001 - an op missing from this build
        return False


def cpu_description() -> str:
    flags = cpu_flags()
    extras = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2") if f in flags]
    return f"{torch.backends.cpu.get_cpu_capability()} ({', '.join(extras) or 'no flags read'})"



@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run a block with `n` intra-op threads (None: unchanged)."""
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
