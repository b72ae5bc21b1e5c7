"""Estimates before any work: what the model holds, what the checkpoint will
weigh, and how much memory a run needs, from headers and the config only (no
weight is read). ``calib run --dry-run`` prints them.

The memory figures are estimates, not promises: a CPU process's RSS also
depends on the allocator keeping freed blocks (see README, "Peak RSS").
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from calib.errors import CalibInputError

RUNTIME_OVERHEAD = 768 * 2**20  # torch, transformers, tokenizers and the allocator's slack, measured ~0.6-0.8 GB
SAFE_FRACTION = 0.8  # of the memory available when the run starts, the default --max-memory

SAFETENSORS_DTYPES = {"F64": "float64", "I64": "int64", "U64": "uint64", "F32": "float32", "I32": "int32",
                      "U32": "uint32", "F16": "float16", "BF16": "bfloat16", "I16": "int16", "U16": "uint16",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool"}


@dataclass
class TensorStats:
    """Parameters and bytes per dtype of a set of tensors."""

    params: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    def add(self, dtype: str, numel: int, nbytes: int) -> None:
        self.params[dtype] = self.params.get(dtype, 0) + numel
        self.bytes[dtype] = self.bytes.get(dtype, 0) + nbytes

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def safetensors_stats(folder: Path) -> TensorStats:
    """Parameters and bytes per dtype from the safetensors headers of a model folder (no data read)."""
    stats = TensorStats()
    files = sorted(Path(folder).glob("*.safetensors"))
    for path in files:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            numel = 1
            for dim in entry["shape"]:
                numel *= int(dim)
            start, end = entry["data_offsets"]
            stats.add(SAFETENSORS_DTYPES.get(entry["dtype"], entry["dtype"]), numel, int(end) - int(start))
    return stats


def module_stats(model: nn.Module, dtype: torch.dtype | None = None) -> TensorStats:
    """Parameters and bytes per dtype of a model's parameters (a ``meta`` skeleton
    is fine), as loaded in ``dtype``; tied parameters once."""
    stats, seen = TensorStats(), set()
    for tensor in model.parameters():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        kind = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        stats.add(str(kind).removeprefix("torch."), tensor.numel(), tensor.numel() * kind.itemsize)
    return stats


def forward_workspace_bytes(config, batch_size: int, seq_len: int, element_size: int = 4,
                            logits: bool = False) -> int:
    """The largest transient tensors of one decoder forward over a batch:
    hidden states and their norms/residuals, the MLP's intermediate, the
    attention scores (batch x heads x seq x seq) and, when computed, the logits."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    inner = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    tokens = batch_size * seq_len
    per_token = 6 * hidden + 3 * inner + heads * seq_len + (vocab if logits else 0)
    return tokens * per_token * element_size


def in_memory_peak_bytes(model_bytes: int, workspace_bytes: int) -> int:
    """Whole model resident, plus one forward's workspace, plus the runtime."""
    return model_bytes + workspace_bytes + RUNTIME_OVERHEAD


def available_memory_bytes(device: torch.device | None = None) -> int:
    """Memory free for this run: the GPU's free memory for CUDA, else MemAvailable (Linux)."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * size)


def default_budget_bytes(device: torch.device | None = None) -> int:
    return int(available_memory_bytes(device) * SAFE_FRACTION)


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str) -> int:
    """``"4GB"`` / ``"3.5GiB"`` / ``"800MB"`` -> bytes (KB/MB/GB powers of 10, KiB/MiB/GiB of 2)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match or match.group(2) not in SIZE_UNITS:
        raise CalibInputError(f"--max-memory {text!r} is not a size like 4GB, 800MB or 3.5GiB")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise CalibInputError(f"--max-memory {text!r} must be positive")
    return size


def human(size: float) -> str:
    """``1234567`` -> ``"1.2 MB"``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
