"""Where a run computes: the device choice, bf16 autocast on CUDA, moving batches."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """The device a run uses: CUDA when available for "auto", else the one named (checked to exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but no CUDA device is available on this machine; "
                         "choose device 'cpu' (or 'auto', which picks CUDA only when there is one).")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s); choose 'cuda:0' or 'auto'.")
    return chosen


def use_bf16(bf16: bool | str, device: torch.device) -> bool:
    """bf16 autocast only on CUDA, and only when asked ("auto" or True) and supported."""
    if device.type != "cuda" or bf16 is False:
        return False
    return torch.cuda.is_bf16_supported()


def autocast(enabled: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}
