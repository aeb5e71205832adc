"""Where torch runs and how: the device (``pick_device``), the CPU threads (``usable_cores``,
``torch_threads``) and the number formats the hardware computes fast (``cpu_has_bf16``,
``resolve_precision``, ``autocast``). Shared by learning, scoring and fine-tuning."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import LaionfilterError


def pick_device(name: str = "auto") -> torch.device:
    """``name`` as a device (``auto``: a CUDA GPU where one is visible, else the CPU); a clear error for
    a GPU this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LaionfilterError(f"--device {name}: no CUDA GPU is visible on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LaionfilterError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int):
    """torch on ``n`` CPU threads within the block; the count before is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def autocast(device: torch.device):
    """bf16 autocast on GPU; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this processor computes in bf16 natively (AVX-512 BF16 or AMX): then a bf16 ViT runs several
    times faster than float32 on it (benchmarks/README.md, "Scoring speed"). Linux's /proc/cpuinfo, else False."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the vision tower's weights are held in: ``auto`` is bf16 on a GPU that has it and on a CPU
    with AVX-512 BF16 or AMX, float32 elsewhere. The score head always runs in float32."""
    if precision not in PRECISIONS:
        raise LaionfilterError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_bf16()
        precision = "bf16" if fast else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32
