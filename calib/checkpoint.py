"""Checkpoint space: the tensors of a model as its checkpoint names and stores them.

Two name spaces meet in calib (DESIGN.md, "Two name spaces"): the *checkpoint's*
(what the safetensors files on disk call each tensor, what serving stacks load)
and the *module's* (the parameter names of the transformers model that runs the
calibration forwards). This module holds the checkpoint side:

* :class:`TensorSource`: a checkpoint's tensors in checkpoint order, with their
  dtype and shape read from the headers, each tensor loaded on its own, and a
  way to copy a tensor's raw bytes unchanged (:class:`RawTensor`).
  :class:`SafetensorsSource` reads a local folder (``model.safetensors`` or an
  index and its shards) one tensor at a time; :class:`StateDictSource` presents
  a model in memory (GGUF models, API callers with only a model object) as the
  checkpoint ``save_pretrained`` would write.
* :class:`NameMap`: checkpoint name <-> module state-dict key for one model,
  using transformers' own load-time rules (``conversion_mapping.py``:
  ``WeightRenaming`` such as GPT-NeoX's ``embed_out.`` -> ``lm_head.``, and the
  base-model prefix added or stripped, e.g. BERT's ``bert.``). Identity where
  the names match, which is every dense model but a few.

What is an error, and what is not:

* a source tensor that maps to no module tensor is an error naming it, unless
  the model class lists it in ``_keys_to_ignore_on_load_unexpected`` (tensors
  transformers drops on load on purpose, e.g. a stored ``rotary_emb.inv_freq``):
  those are copied to the output unchanged, like every tensor calib does not
  quantize;
* a module tensor that no source tensor maps to is an error naming it, unless
  it is tied to one that has a source tensor (``lm_head.weight`` tied to the
  embeddings: the source stores one, the output stores one, loaders re-tie), or
  the class lists it in ``_keys_to_ignore_on_load_missing``;
* a source tensor that transformers would *convert* on load (a
  ``WeightConverter``: per-expert MoE weights stacked into one 3-D parameter)
  maps to its per-expert module when calib has split the experts
  (:func:`calib.moe.unfuse_experts`: the module keys are then the renamed
  checkpoint names); any other conversion (fused q/k/v split, experts calib
  could not split) is a "not yet supported" error naming the tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from calib.errors import CalibInputError
from calib.export import TensorSpec

log = logging.getLogger(__name__)

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SHOWN = 10  # names listed in an error before "and N more"
COPY_CHUNK = 64 << 20  # bytes per read/write when the kernel cannot copy file to file itself

# safetensors dtype codes -> torch dtypes (the inverse of calib.export.SAFETENSORS_DTYPES)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        _DTYPES[_code] = getattr(torch, _name)


def _names(items: Iterable) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


# ---------------------------------------------------------------------------------------------
# Raw bytes


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes, little-endian (safetensors' byte order), without a copy where possible."""
    from calib.export import _little_endian_bytes

    return _little_endian_bytes(tensor.detach().to("cpu").contiguous())


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written (one call writes at most ~2 GiB)."""
    data = data.cast("B") if data.format != "B" else data
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:done + (1 << 30)], offset + done)


def copy_file_bytes(src_fd: int, src_offset: int, length: int, dst_fd: int, dst_offset: int) -> None:
    """Copy ``length`` bytes between two files at the given offsets, in the kernel
    (``copy_file_range``) where it can, else through a bounded buffer."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(src_fd, dst_fd, length - done, src_offset + done, dst_offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # another file system, an old kernel: copy through memory below
    while done < length:
        chunk = os.pread(src_fd, min(COPY_CHUNK, length - done), src_offset + done)
        if not chunk:
            raise OSError(f"unexpected end of file copying {length} bytes at offset {src_offset}")
        pwrite_all(dst_fd, memoryview(chunk), dst_offset + done)
        done += len(chunk)


@dataclass(frozen=True, eq=False)
class RawTensor(TensorSpec):
    """A tensor to be written with exactly the bytes its source holds: from a
    file region (copied file to file, never through a torch tensor) or from a
    tensor in memory. It quacks like a tensor for the shape/dtype questions a
    safetensors writer asks (``dtype``, ``shape``, ``numel()``, ``element_size()``)."""

    path: str | None = None  # file-backed: the file, and where the bytes start
    offset: int = 0
    tensor: torch.Tensor | None = field(default=None, repr=False)  # memory-backed
    source: "SafetensorsSource | None" = field(default=None, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return self.numel() * self.element_size()

    def write_to(self, fd: int, offset: int) -> None:
        """Write the bytes at ``offset`` of the open file ``fd``."""
        if not self.nbytes:
            return
        if self.tensor is not None:
            pwrite_all(fd, _tensor_bytes(self.tensor), offset)
            return
        with self.source.fd(self.path) as src:
            copy_file_bytes(src, self.offset, self.nbytes, fd, offset)

    def load(self) -> torch.Tensor:
        """The tensor itself (for writers that want one)."""
        if self.tensor is not None:
            return self.tensor
        return self.source._read(self.path, self.offset, self.dtype, self.shape)


# ---------------------------------------------------------------------------------------------
# Sources


@runtime_checkable
class TensorSource(Protocol):
    """A checkpoint's tensors, one at a time, under the checkpoint's names."""

    where: str  # how messages name the source (a folder, a model class)

    def names(self) -> list[str]:
        """Every tensor name, in checkpoint order."""

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """(dtype, shape) from the headers: no data is read."""

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read on its own (a fresh CPU tensor for files)."""

    def raw(self, name: str) -> RawTensor:
        """The tensor's bytes, to be copied to the output unchanged."""


@dataclass(frozen=True)
class _Entry:
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


def _read_header(path: Path) -> tuple[int, dict]:
    """(data start, header dict) of a safetensors file already validated by
    :func:`calib.models._check_safetensors`."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length).decode("utf-8"))
    return 8 + length, header


class SafetensorsSource:
    """A local folder's safetensors weights: ``model.safetensors``, or
    ``model.safetensors.index.json`` and the shards it names.

    Everything is checked on construction, before any data is read: a missing
    or truncated shard, a corrupt header, an index naming a tensor its shard
    does not hold, a tensor stored twice: each a :class:`CalibInputError`
    naming the file and the tensors. Tensors are read one at a time with
    ``pread`` into a fresh tensor (no memory map stays behind, so the process
    holds the tensors it works on and nothing else); :meth:`raw` copies a
    tensor's bytes file to file in the kernel.

    Order: shards by file name, and within a shard by position in the file
    (sequential reads). As transformers does, every tensor of every shard the
    index names is part of the checkpoint, listed in the index or not.
    """

    def __init__(self, folder: str | Path) -> None:
        from calib.models import _safetensors_files

        self.folder = Path(folder)
        self.where = str(self.folder)
        if not self.folder.is_dir():
            raise CalibInputError(f"{self.folder} is not a folder with safetensors weights")
        files = _safetensors_files(self.folder)  # validates the index, the shards' headers and sizes
        if files is None:
            raise CalibInputError(
                f"{self.folder} has no safetensors weights ({SAFETENSORS_FILE} or {SAFETENSORS_INDEX}); calib "
                "streams tensors from safetensors files only")
        index = self.folder / SAFETENSORS_INDEX
        shards = sorted(p for p in files if p.name != SAFETENSORS_INDEX)
        self._entries: dict[str, _Entry] = {}
        self._order: list[str] = []
        found_in: dict[str, str] = {}
        for shard in shards:
            start, header = _read_header(shard)
            rows = []
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                dtype = _DTYPES.get(meta.get("dtype"))
                if dtype is None:
                    raise CalibInputError(f"{shard}: tensor {name} has dtype {meta.get('dtype')!r}, which calib "
                                          "cannot read")
                shape = tuple(int(d) for d in meta["shape"])
                begin, end = (int(x) for x in meta["data_offsets"])
                numel = 1
                for d in shape:
                    numel *= d
                nbytes = numel * torch.empty((), dtype=dtype).element_size()
                if end - begin != nbytes:
                    raise CalibInputError(f"{shard}: tensor {name} ({meta.get('dtype')} {list(shape)}) spans "
                                          f"{end - begin} bytes instead of {nbytes}: the file is corrupt. Download "
                                          "or copy it again.")
                if name in found_in:
                    raise CalibInputError(f"tensor {name} is stored twice, in {found_in[name]} and {shard.name}: "
                                          "the checkpoint is inconsistent; re-export or copy it again.")
                found_in[name] = shard.name
                rows.append((begin, name, _Entry(str(shard), dtype, shape, start + begin, nbytes)))
            for _, name, entry in sorted(rows, key=lambda r: (r[0], r[1])):
                self._entries[name] = entry
                self._order.append(name)
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            absent = [f"{name} (in {shard})" for name, shard in weight_map.items() if found_in.get(name) != shard]
            if absent:
                raise CalibInputError(
                    f"{index} names tensors that are not in the shard it gives: {_names(absent)}. The index and the "
                    "shards do not belong together: copy them again from the same checkpoint.")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian; so is every host we know
            raise CalibInputError("streaming safetensors on a big-endian machine is not supported")

    # --- the protocol

    def names(self) -> list[str]:
        return list(self._order)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        entry = self._entry(name)
        return entry.dtype, entry.shape

    def get(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        return self._read(entry.path, entry.offset, entry.dtype, entry.shape)

    def raw(self, name: str) -> RawTensor:
        entry = self._entry(name)
        return RawTensor(entry.dtype, entry.shape, path=entry.path, offset=entry.offset, source=self)

    # --- helpers

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.where} has no tensor {name}") from None

    @contextlib.contextmanager
    def fd(self, path: str):
        """A read-only descriptor of ``path`` (opened once, shared: ``pread`` needs no position)."""
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                if hasattr(os, "posix_fadvise"):  # read in order: a larger read-ahead
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        yield fd

    def will_need(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now (``POSIX_FADV_WILLNEED``),
        so the disk works while the tensors before it are computed."""
        if not hasattr(os, "posix_fadvise"):
            return
        entry = self._entry(name)
        if entry.nbytes:
            with self.fd(entry.path) as fd:
                os.posix_fadvise(fd, entry.offset, entry.nbytes, os.POSIX_FADV_WILLNEED)

    def read_into(self, name: str, buffer: torch.Tensor) -> torch.Tensor:
        """The tensor read into ``buffer`` (a uint8 tensor of at least its size):
        a view of the buffer, valid until the buffer is reused. Reusing buffers
        spares the kernel faulting in and zeroing fresh pages for every tensor."""
        entry = self._entry(name)
        if buffer.dtype != torch.uint8 or buffer.numel() < entry.nbytes:
            raise ValueError(f"buffer of {buffer.numel()} bytes is too small for {name} ({entry.nbytes} bytes)")
        tensor = buffer[:entry.nbytes].view(entry.dtype).reshape(entry.shape)
        return self._read(entry.path, entry.offset, entry.dtype, entry.shape, out=tensor)

    def _read(self, path: str, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
              out: torch.Tensor | None = None) -> torch.Tensor:
        tensor = torch.empty(shape, dtype=dtype) if out is None else out
        if not tensor.numel():
            return tensor
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with self.fd(path) as fd:
            done = 0
            while done < len(buffer):
                n = os.preadv(fd, [buffer[done:]], offset + done)
                if n <= 0:
                    raise CalibInputError(f"{path} ended while reading a tensor: the file changed or was truncated "
                                          "after calib checked it")
                done += n
        return tensor

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort, also at interpreter exit
        try:
            self.close()
        except BaseException:
            pass

    def __repr__(self) -> str:
        return f"SafetensorsSource({self.where!r}, {len(self._order)} tensors)"


class StateDictSource:
    """A model in memory as a checkpoint: its ``state_dict`` in order, each tied
    tensor once (under its first name, as calib always wrote them), named as
    ``save_pretrained`` would name them (transformers' load-time renamings
    reversed, e.g. GPT-NeoX's ``lm_head.weight`` is written ``embed_out.weight``).

    Tensors that transformers converts rather than renames on save (MoE experts
    stacked into one 3-D parameter) keep their module names, as calib wrote
    them before.
    """

    def __init__(self, model: nn.Module, checkpoint_names: bool = True) -> None:
        self.model = model
        self.where = type(model).__name__
        seen: set[tuple[int, tuple[int, ...]]] = set()
        self._tensors: dict[str, torch.Tensor] = {}
        self._module_key: dict[str, str] = {}
        reverse = _save_renamer(model) if checkpoint_names else None
        for key, tensor in model.state_dict(keep_vars=False).items():
            storage = (tensor.data_ptr(), tuple(tensor.shape))
            if tensor.numel() and storage in seen:
                continue  # a tied weight already present under another name
            seen.add(storage)
            name = reverse(key) if reverse is not None else key
            if name in self._tensors:
                raise CalibInputError(f"{self.where}: tensors {self._module_key[name]} and {key} would both be saved "
                                      f"as {name}")
            self._tensors[name] = tensor
            self._module_key[name] = key

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        tensor = self._tensors[name]
        return tensor.dtype, tuple(tensor.shape)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()

    def raw(self, name: str) -> RawTensor:
        tensor = self._tensors[name]
        return RawTensor(tensor.dtype, tuple(tensor.shape), tensor=tensor.detach())

    def module_key(self, name: str) -> str:
        """The state-dict key this checkpoint name came from."""
        return self._module_key[name]

    def __repr__(self) -> str:
        return f"StateDictSource({self.where}, {len(self._tensors)} tensors)"


# ---------------------------------------------------------------------------------------------
# transformers' rules, forward (load) and reversed (save)


def _conversion_rules(model: nn.Module, for_save: bool = False):
    """(renamings, converters) transformers applies to ``model``'s checkpoint keys
    on load (or, ``for_save``, the reversed ones ``save_pretrained`` applies); None
    when this transformers has no such rules (4.x) or the model is not a
    transformers model."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    if for_save:
        conversions = getattr(model, "_weight_conversions", None)
        if conversions is None:  # built from a config, not loaded: what save_pretrained does then
            conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                           if not isinstance(c, PrefixChange)]
        conversions = [c.reverse_transform() for c in conversions[::-1]]
    else:
        conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    return renamings, converters


def _save_renamer(model: nn.Module):
    """``module key -> checkpoint name`` as ``save_pretrained`` names it (renamings only)."""
    rules = _conversion_rules(model, for_save=True)
    if rules is None or not any(rules):
        return None
    from transformers.core_model_loading import apply_converters, apply_renamings

    renamings, converters = rules

    def rename(key: str) -> str:
        _, pattern = apply_converters(key, converters)
        if pattern is not None:
            return key  # converted on save (stacked experts ...): keep the module name
        return apply_renamings(key, renamings)

    return rename


def _ignored(patterns, name: str) -> bool:
    return any(re.search(p, name) for p in (patterns or []))


def _ignore_patterns(model: nn.Module) -> tuple[set[str], set[str]]:
    """(missing, unexpected) key patterns transformers forgives on load: the
    model's ``_keys_to_ignore_on_load_missing/unexpected`` (gathered from its
    submodels), plus the per-layer ``rotary_emb.inv_freq`` and ``position_ids``
    of old checkpoints where the model has such buffers (as
    ``PreTrainedModel._adjust_missing_and_unexpected_keys`` does)."""
    missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        unexpected.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        unexpected.add(r"(^|\.)position_ids$")
    return missing, unexpected


# ---------------------------------------------------------------------------------------------
# The name map


@dataclass
class NameMap:
    """Checkpoint name <-> module state-dict key for one model and one source.

    ``module_of`` is ``None`` for a source tensor the model does not load (one of
    ``_keys_to_ignore_on_load_unexpected``: copied through unchanged);
    ``checkpoint_of`` is ``None`` for a module tensor the source does not store
    (tied to one it stores).
    """

    to_module: dict[str, str | None]
    to_checkpoint: dict[str, str]
    module_keys: list[str] = field(default_factory=list)  # the model's state-dict keys, in order
    parameter_keys: list[str] = field(default_factory=list)  # its parameters (tied ones under every name)
    tied: dict[str, str] = field(default_factory=dict)  # module key absent from the source -> its stored partner

    @classmethod
    def identity(cls, names: Iterable[str]) -> "NameMap":
        names = list(names)
        return cls(to_module={n: n for n in names}, to_checkpoint={n: n for n in names}, module_keys=names,
                   parameter_keys=[n for n in names if n.endswith((".weight", ".bias"))])

    @classmethod
    def for_model(cls, model: nn.Module, source: TensorSource) -> "NameMap":
        """The map between ``source``'s names and ``model``'s (a loaded model or
        its ``meta``-device skeleton), with the checks the module docstring lists."""
        if isinstance(source, StateDictSource) and source.model is model:
            return cls._from_state_dict_source(model, source)
        state = model.state_dict(keep_vars=True)
        rules = _conversion_rules(model)
        prefix = getattr(model, "base_model_prefix", "") or None
        to_module: dict[str, str | None] = {}
        to_checkpoint: dict[str, str] = {}
        converted, unknown, twice = [], [], []
        missing_ok, unexpected_ok = _ignore_patterns(model)
        for name in source.names():
            key, converter = _load_key(name, rules, prefix, state)
            if converter is not None:
                converted.append(name)
                continue
            if key not in state:
                if _ignored(unexpected_ok, name) or _ignored(unexpected_ok, key):
                    to_module[name] = None  # dropped by transformers on load: copied through as it is
                    continue
                unknown.append(name)
                continue
            if key in to_checkpoint:
                twice.append(f"{to_checkpoint[key]} and {name} (both {key})")
                continue
            to_module[name] = key
            to_checkpoint[key] = name
        where = source.where
        if converted:
            raise CalibInputError(
                f"{where}: transformers converts these tensors on load rather than renaming them (fused or stacked "
                f"MoE/attention weights), which calib's checkpoint-space writer does not support yet: "
                f"{_names(converted)}")
        if unknown:
            raise CalibInputError(
                f"{where} holds tensors that {type(model).__name__} has no place for: {_names(unknown)}. The weights "
                "and config.json do not describe the same model; fix config.json or re-export the checkpoint.")
        if twice:
            raise CalibInputError(f"{where}: two tensors load into the same parameter: {_names(twice)}")
        tied, missing = _tied_and_missing(state, to_checkpoint, missing_ok)
        if missing:
            raise CalibInputError(
                f"{where} has no tensor for these parameters of {type(model).__name__}: {_names(missing)}. "
                "transformers would initialise them at random; calib will not quantize random weights. Fix "
                "config.json or re-export the checkpoint.")
        return cls(to_module=to_module, to_checkpoint=to_checkpoint, module_keys=list(state),
                   parameter_keys=[n for n, _ in model.named_parameters(remove_duplicate=False)], tied=tied)

    @classmethod
    def _from_state_dict_source(cls, model: nn.Module, source: StateDictSource) -> "NameMap":
        state = model.state_dict(keep_vars=True)
        to_module = {name: source.module_key(name) for name in source.names()}
        to_checkpoint = {key: name for name, key in to_module.items()}
        tied, missing = _tied_and_missing(state, to_checkpoint, _ignore_patterns(model)[0])
        if missing:  # cannot happen: every state-dict key is stored or shares a stored tensor
            raise CalibInputError(f"{type(model).__name__}: no tensor for {_names(missing)}")
        return cls(to_module=to_module, to_checkpoint=to_checkpoint, module_keys=list(state),
                   parameter_keys=[n for n, _ in model.named_parameters(remove_duplicate=False)], tied=tied)

    # --- lookups

    def module_of(self, name: str) -> str | None:
        return self.to_module.get(name)

    def checkpoint_of(self, key: str) -> str | None:
        """The checkpoint name of a module key (of its stored partner if it is tied)."""
        return self.to_checkpoint.get(key) or self.to_checkpoint.get(self.tied.get(key, ""))

    def checkpoint_prefix(self, module: str) -> str:
        """A module's name in checkpoint space: the prefix its tensors are stored
        under (``lm_head`` -> ``embed_out`` for GPT-NeoX; identity elsewhere)."""
        dot = module + "."
        for key, name in self.to_checkpoint.items():
            if key.startswith(dot):
                rest = key[len(dot):]
                if name.endswith("." + rest):
                    return name[: -len(rest) - 1]
        return module

    def first_parameter(self, module: str) -> str | None:
        """The checkpoint name of a module's first parameter (what decides its dtype)."""
        dot = module + "."
        for key in self.parameter_keys:
            if key.startswith(dot):
                return self.checkpoint_of(key)
        return None


def _load_key(name: str, rules, prefix: str | None, state: dict) -> tuple[str, object]:
    """(module key, converter pattern or None) for a checkpoint name, the way
    transformers' ``convert_and_load_state_dict_in_model`` computes it."""
    if rules is not None:
        from transformers.core_model_loading import rename_source_key

        renamings, converters = rules
        key, converter = rename_source_key(name, renamings, converters, prefix, state)
        if converter is not None:
            # A tensor transformers would stack (per-expert MoE weights): calib splits the fused
            # experts back into per-expert modules (calib.moe), whose keys are the renamed names.
            renamed, _ = rename_source_key(name, renamings, [], prefix, state)
            if renamed in state:
                return renamed, None
        if key not in state and name in state:
            key, converter = rename_source_key(name, [], [], prefix, state)
        return key, converter
    # transformers 4.x, or not a transformers model: the base-model prefix only
    if name in state or not prefix:
        return name, None
    if name.startswith(prefix + ".") and name[len(prefix) + 1:] in state:
        return name[len(prefix) + 1:], None
    if f"{prefix}.{name}" in state:
        return f"{prefix}.{name}", None
    return name, None


def _tied_and_missing(state: dict, to_checkpoint: dict[str, str],
                      missing_ok: set[str]) -> tuple[dict[str, str], list[str]]:
    """Module keys without a source tensor: those tied to a stored one (same
    parameter object), and the others (missing), minus the patterns
    transformers forgives (``missing_ok``)."""
    by_object: dict[int, list[str]] = {}
    for key, value in state.items():
        by_object.setdefault(id(value), []).append(key)
    groups = list(by_object.values())
    if not any(t.is_meta for t in state.values()):  # real tensors: shared storage also ties (as calib dedups)
        by_storage: dict[tuple, list[str]] = {}
        for key, value in state.items():
            if value.numel():
                by_storage.setdefault((value.data_ptr(), tuple(value.shape)), []).append(key)
        groups += [keys for keys in by_storage.values() if len(keys) > 1]
    tied: dict[str, str] = {}
    for keys in groups:
        stored = next((k for k in keys if k in to_checkpoint), None)
        if stored is not None:
            tied.update({k: stored for k in keys if k not in to_checkpoint})
    missing = [k for k in state if k not in to_checkpoint and k not in tied and not _ignored(missing_ok, k)]
    return tied, missing


def module_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Module key -> dtype of a model in memory: the ``dtype`` that makes a stream
    over its source cast every tensor exactly as loading it did."""
    return {key: tensor.dtype for key, tensor in model.state_dict().items()}


def name_map_for(model: nn.Module | None, source: TensorSource) -> NameMap:
    """The name map for ``source`` and ``model`` (identity without a model)."""
    if model is None:
        return NameMap.identity(source.names())
    return NameMap.for_model(model, source)
