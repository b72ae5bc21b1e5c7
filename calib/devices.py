"""Which device calibration runs on, checked before any work.

A device that does not exist or is not available is a clear input error at
start-up, not a traceback after the model has loaded.
"""

from __future__ import annotations

import torch

from calib.errors import CalibInputError


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    text = str(spec).strip()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CalibInputError(f"--device {text!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise CalibInputError(
                f"--device {text}: no CUDA device is available to this process (torch {torch.__version__}, "
                f"{build}). Use --device cpu, or install a CUDA build of torch on a machine with a GPU."
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CalibInputError(f"--device {text}: this machine has {count} CUDA device(s), "
                                  f"numbered 0 to {count - 1}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CalibInputError(f"--device {text}: Apple MPS is not available here; use --device cpu")
        return device
    raise CalibInputError(f"--device {text}: calib runs on cpu, cuda or mps, not {device.type}")
