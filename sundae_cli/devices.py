"""Devices and precision: what `auto` means, and what this machine has.

`device = "auto"` picks CUDA, then Apple's MPS, then the CPU. `precision = "auto"` picks
bf16 autocast on CUDA devices that support it and fp32 everywhere else (bf16 matmuls are
slow on most CPUs, so the CPU path always trains and samples in fp32).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from sundae_cli.errors import InputError

if TYPE_CHECKING:
    import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn `auto`, `cpu`, `cuda`, `cuda:N` or `mps` into an available device."""
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise InputError(
            f"device {spec!r} is not a device name ({exc})",
            hint="use auto, cpu, cuda, cuda:N or mps (see `sundae devices`)",
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                f"device {spec!r} requested but CUDA is not available here",
                hint='use --device cpu or device = "auto" in the recipe',
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(
                f"device {spec!r} requested but only {torch.cuda.device_count()} "
                "CUDA devices exist",
                hint="see `sundae devices`",
            )
    elif device.type == "mps" and not _mps_available():
        raise InputError(
            "device 'mps' requested but MPS is not available here",
            hint='use --device cpu or device = "auto"',
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise InputError(
            f"device {spec!r} is not supported", hint="use auto, cpu, cuda or mps"
        )
    return device


def resolve_precision(spec: str, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on CUDA devices that support it, else fp32."""
    import torch

    if spec == "fp32":
        return torch.float32
    if spec == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def autocast(
    device: torch.device, dtype: torch.dtype
) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or a no-op for fp32."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def describe_devices() -> dict[str, Any]:
    """What `sundae devices` prints: CPU threads, CUDA devices, MPS, `auto`."""
    import torch

    cuda = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            cuda.append(
                {
                    "index": index,
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "capability": f"{props.major}.{props.minor}",
                }
            )
    auto = resolve_device("auto")
    return {
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": cuda,
        "mps": _mps_available(),
        "auto_device": str(auto),
        "auto_precision": str(resolve_precision("auto", auto)).replace("torch.", ""),
    }
