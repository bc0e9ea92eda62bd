"""Choosing the device once: ``auto`` = cuda, then mps, then cpu."""

from __future__ import annotations

import torch

from ddpmkit.errors import ConfigError


def pick_device(spec: str = "auto") -> torch.device:
    """The torch.device for ``spec``; ConfigError if that device is not available here."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device = '{spec}' but CUDA is not available on this machine (use 'auto' or 'cpu')")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device = '{spec}' but MPS is not available on this machine (use 'auto' or 'cpu')")
    return device
