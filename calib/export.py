"""Writing a checkpoint: safetensors shards (+ index), config.json with the
compressed-tensors ``quantization_config``, tokenizer, generation config, and
provenance in each shard's ``__metadata__``.

Writes are atomic: everything goes to a temporary directory beside the output
and is renamed into place only when complete, so an interrupted run never
leaves a checkpoint that looks whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from calib.errors import CalibInputError

log = logging.getLogger(__name__)

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match or match.group(2) not in SIZE_UNITS:
        raise CalibInputError(f"--max-shard-size {text!r} is not a size like 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise CalibInputError(f"--max-shard-size {text!r} must be positive")
    return size


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse a non-empty output unless ``overwrite`` (checked before any heavy work)."""
    if output.exists() and not output.is_dir():
        raise CalibInputError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CalibInputError(f"output directory {output} is not empty; pass --overwrite to replace it "
                              "or choose another --output")


@contextlib.contextmanager
def atomic_directory(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``output``; on success it replaces ``output``."""
    output = Path(output).resolve()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, old / "previous")
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class WrittenCheckpoint:
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0  # tensor bytes
    num_tensors: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> tensor count


def write_tensors(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str],
                  max_shard_size: int) -> WrittenCheckpoint:
    """Stream tensors into shards of at most ``max_shard_size`` bytes (a single
    tensor larger than that gets a shard of its own)."""
    result = WrittenCheckpoint()
    metadata = {"format": "pt", **metadata}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    weight_map: dict[str, str] = {}
    temp_names: list[Path] = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if not shard:
            return
        path = folder / f"shard-{len(temp_names):05d}.tmp"
        save_file(shard, str(path), metadata=metadata)
        temp_names.append(path)
        for key in shard:
            weight_map[key] = path.name
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        if name in weight_map or name in shard:
            raise RuntimeError(f"tensor {name} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_size:
            flush()
        shard[name] = tensor
        shard_bytes += size
        result.total_bytes += size
        result.num_tensors += 1
        key = str(tensor.dtype).removeprefix("torch.")
        result.dtypes[key] = result.dtypes.get(key, 0) + 1
    flush()
    if not temp_names:
        raise RuntimeError("no tensors to write")

    count = len(temp_names)
    final = {}
    for i, path in enumerate(temp_names):
        name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        os.replace(path, folder / name)
        final[path.name] = name
        result.files.append(name)
    if count > 1:
        index = {"metadata": {"total_size": result.total_bytes},
                 "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return result


def model_config_dict(model, quantization_config: dict) -> dict:
    """The model's config.json content with our ``quantization_config``.

    Any previous ``quantization_config`` (e.g. GGUF's, after dequantizing on
    load) is replaced: the weights we write are what the new one describes.
    """
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = quantization_config
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    return config


def write_side_files(folder: Path, model, tokenizer, config: dict, recipe_yaml: str) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    (folder / "recipe.yaml").write_text(recipe_yaml)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(folder))
