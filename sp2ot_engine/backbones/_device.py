"""Devices: resolving ``"auto"``/``"cpu"``/``"cuda:N"``, and the CPU allocator setting that
keeps forward passes from page-faulting their activations in afresh."""
from __future__ import annotations

import os

import torch


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` -> torch.device.

    Raises ValueError for an unknown string or a CUDA device that is not available.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: no CUDA device is available on this machine; use 'cpu' or 'auto'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device={device!r}: only {n} CUDA device(s) available (cuda:0..cuda:{n - 1})")
        return dev
    raise ValueError(f"device={device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Stop glibc from returning big freed blocks to the OS after every CPU forward pass.

    By default glibc serves allocations above a (dynamic, <= 32 MB) threshold with ``mmap`` and
    unmaps them on free, so every conv activation is page-faulted in afresh: on this 2-core
    machine that was ~45% of EfficientNet-Lite0's CPU time at batch 64 x 224 px (22 of ~55 ms per
    image in the kernel). This sets ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` to 1 GiB (freed
    memory stays in the heap for reuse, up to 1 GiB of slack) via ``mallopt``. Linux/glibc only;
    a no-op elsewhere, or when the environment variable ``SP2OT_MALLOC_TUNING=0``. Idempotent.
    Returns True if the settings were applied (now or earlier).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("SP2OT_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import ctypes
        import platform

        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except Exception:
        return False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED
