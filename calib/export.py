"""Writing a checkpoint: safetensors shards (+ index), config.json with the
compressed-tensors ``quantization_config``, tokenizer, generation config, and
provenance in each shard's ``__metadata__``.

Writes are atomic and exclusive: everything goes to a temporary directory
beside the output (``.{name}.partial-{pid}-{random}``) that is moved into place
only when complete, with ``renameat2`` on Linux (``RENAME_NOREPLACE`` without
overwrite, so a concurrent run cannot be silently replaced; ``RENAME_EXCHANGE``
with overwrite, so there is never a moment without a checkpoint). Leftovers of
killed runs are cleaned up by the next run. Shards are written by our own
safetensors writer so identical tensors give identical bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import platform
import re
import secrets
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from calib.errors import CalibInputError

log = logging.getLogger(__name__)

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
FREE_SPACE_MARGIN = 64 * 2**20  # bytes kept free beyond the checkpoint (side files, filesystem slack)
DISK_FULL_ERRNOS = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code)

PathLike = str | os.PathLike


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


def _human(size: float) -> str:
    """``1234567`` -> ``"1.2 MB"`` for messages."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


# ---------------------------------------------------------------------------------------------
# Checks before any heavy work


def _protected_overlap(output: Path, protected: Iterable[PathLike | None]) -> Path | None:
    """The first existing protected path that ``output`` is, contains or lies inside."""
    for item in protected:
        if item is None or str(item) == "":
            continue
        path = Path(item).expanduser()
        if not path.exists():  # a hub id or a name that is not on this disk: nothing to protect
            continue
        path = path.resolve()
        if output == path or output in path.parents or path in output.parents:
            return path
    return None


def _refuse_protected(output: Path, protected: Iterable[PathLike | None]) -> None:
    """Writing at, above or inside the model or the data would replace or delete it."""
    output = Path(output).expanduser().resolve()
    source = _protected_overlap(output, protected)
    if source is None:
        return
    how = "is" if output == source else "contains" if output in source.parents else "lies inside"
    raise CalibInputError(
        f"output {output} {how} {source}, which this run reads (the model or the dataset); writing there "
        "could replace or delete it, with or without --overwrite. Choose an --output outside it.")


def check_output(output: PathLike, overwrite: bool, protected: Iterable[PathLike | None] = ()) -> None:
    """Refuse an output that is, contains or lies inside a ``protected`` path
    (the model, the dataset), even with ``overwrite``, and a non-empty output
    without ``overwrite``; cheap, meant to run before any heavy work."""
    output = Path(output).expanduser()
    _refuse_protected(output, protected)
    if output.exists() and not output.is_dir():
        raise CalibInputError(f"output {output} exists and is not a directory; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CalibInputError(f"output directory {output} is not empty; pass --overwrite (overwrite=True in "
                              "Python) to replace it or choose another --output")


def check_free_space(folder: PathLike, needed_bytes: int, margin_bytes: int = FREE_SPACE_MARGIN) -> int:
    """Refuse to start writing ``needed_bytes`` into ``folder`` (or its nearest
    existing parent) unless 5 % more plus a margin is free; returns the free bytes.

    A full disk found before writing costs nothing; one found mid-write costs
    the whole run.
    """
    probe = Path(folder).expanduser().resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    required = int(needed_bytes * 1.05) + margin_bytes
    if free < required:
        raise CalibInputError(
            f"not enough free space to write {folder}: the checkpoint needs about {_human(needed_bytes)} "
            f"(plus {_human(required - needed_bytes)} headroom), but {probe} has {_human(free)} free. "
            "Free some space or choose an --output on another disk.")
    return free


# ---------------------------------------------------------------------------------------------
# Permissions and durability


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (the
    set-and-restore fallback is racy with threads creating files meanwhile)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _seal(root: Path) -> None:
    """Give every file and folder under ``root`` the permissions a normal
    ``mkdir``/``open`` would (the temporary folder is private while incomplete,
    and some writers create 0600 files), and fsync them, bottom up."""
    mask = current_umask()
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            os.chmod(path, 0o666 & ~mask)
            _fsync_path(path, os.O_RDONLY)
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o777 & ~mask)
        _fsync_path(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    os.chmod(root, 0o777 & ~mask)


def _fsync_path(path: PathLike, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except (IsADirectoryError, PermissionError):  # Windows cannot open folders: nothing to sync there
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some filesystems cannot sync folders
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Remove a folder tree, file or link if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------------------
# renameat2: the only way to move a folder into place without replacing (or with swapping) what is there

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
use_renameat2 = sys.platform.startswith("linux")  # tests set it False to exercise the portable fallback


def load_renameat2(libc_symbol: bool = True):
    """A callable ``(src: bytes, dst: bytes, flags) -> int`` (0, or -1 with
    errno), or None: libc's ``renameat2`` (glibc 2.28+), else the raw syscall."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    func = getattr(libc, "renameat2", None) if libc_symbol else None
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        func.restype = ctypes.c_int
        return lambda src, dst, flags: func(_AT_FDCWD, src, _AT_FDCWD, dst, flags)
    number = _SYS_RENAMEAT2.get(platform.machine().lower())
    syscall = getattr(libc, "syscall", None)
    if number is None or syscall is None:
        return None
    syscall.restype = ctypes.c_long
    return lambda src, dst, flags: syscall(ctypes.c_long(number), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(src),
                                           ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(dst), ctypes.c_uint(flags))


_renameat2_call = functools.lru_cache(maxsize=1)(load_renameat2)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or filesystem lacks
    it (the caller falls back), OSError for real failures (EEXIST, ENOENT...)."""
    call = _renameat2_call() if use_renameat2 else None
    if call is None:
        return False
    if call(os.fsencode(src), os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; FileExistsError if anything is at ``dst``.

    Without renameat2: check, then ``os.rename``, which on POSIX fails onto a
    non-empty folder or a file (only an empty folder appearing in between
    can be replaced)."""
    if _renameat2(src, dst, RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from exc
        raise


def _temp_name(output: Path, kind: str) -> Path:
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


# ---------------------------------------------------------------------------------------------
# Leftovers of killed runs


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (unsure counts as alive)."""
    if os.name != "posix" or pid <= 0:
        return True  # os.kill(pid, 0) is not a probe on Windows
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. EPERM: alive, owned by someone else
    return True


def _dead_leftovers(output: Path) -> tuple[list[Path], list[Path]]:
    """``(old, partial)`` folders beside ``output`` left by processes no longer alive."""
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(partial|old)-(\d+)-[0-9a-f]+")
    old, partial = [], []
    try:
        entries = sorted(output.parent.iterdir())
    except OSError:
        return old, partial
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and not _pid_alive(int(match.group(2))):
            (old if match.group(1) == "old" else partial).append(entry)
    return old, partial


def _is_missing_or_empty(path: Path) -> bool:
    if not os.path.lexists(path):
        return True
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def recover_leftovers(output: PathLike) -> None:
    """Clean up after runs that were killed while writing ``output``: their
    ``.partial-*`` folders are removed; an ``.old-*`` folder (the previous
    checkpoint, moved aside during a non-atomic replace) is put back if the
    output is missing, else removed. Folders of live processes are left alone."""
    output = Path(output).expanduser().resolve()
    old, partial = _dead_leftovers(output)
    old.sort(key=lambda p: p.stat().st_mtime if p.exists() else 0, reverse=True)  # newest first
    for folder in old:
        if _is_missing_or_empty(output):
            with contextlib.suppress(OSError):
                output.rmdir()
            try:
                _rename_noreplace(folder, output)
                log.warning("restored the previous checkpoint that an interrupted run left in %s to %s",
                            folder, output)
                continue
            except OSError:
                pass
        if not os.path.lexists(folder):  # another run recovered it meanwhile
            continue
        _remove(folder)
        log.warning("removed %s: a previous checkpoint that an interrupted run left beside %s, which exists",
                    folder, output)
    for folder in partial:
        _remove(folder)
        log.warning("removed %s: the unfinished output of an interrupted run", folder)


# ---------------------------------------------------------------------------------------------
# The atomic directory


def _make_temp(output: Path) -> Path:
    """Create the private temporary folder beside ``output``; fails at once
    (before any heavy work) if that folder cannot be written."""
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            tmp = _temp_name(output, "partial")
            with contextlib.suppress(FileExistsError):
                tmp.mkdir(mode=0o700)
                return tmp
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(parent) else ""
        cause = "the disk is full" if exc.errno in DISK_FULL_ERRNOS else (exc.strerror or str(exc))
        raise CalibInputError(f"cannot write to {parent}: {cause}{where}; choose another --output "
                              "(a folder you can write to)") from None
    raise CalibInputError(f"cannot create a temporary folder in {parent}; choose another --output")


def _publish_exclusive(tmp: Path, output: Path) -> None:
    """Move ``tmp`` to ``output`` unless something appeared there meanwhile."""
    if os.path.isdir(output) and not os.path.islink(output):
        try:
            os.rmdir(output)  # empty when checked: check_output allowed it; a full one stays
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise CalibInputError(f"cannot replace the empty folder {output}: {exc.strerror}; remove it "
                                      "or choose another --output") from None
    try:
        _rename_noreplace(tmp, output)
    except FileExistsError:
        raise CalibInputError(f"another process wrote {output} while this run was working; nothing was replaced; "
                              "choose another --output or pass --overwrite (overwrite=True in Python)") from None


def _publish_overwrite(tmp: Path, output: Path) -> None:
    """Put ``tmp`` at ``output`` and delete what was there, never leaving a
    moment without a whole checkpoint (where ``RENAME_EXCHANGE`` exists)."""
    for _ in range(10):
        if not os.path.lexists(output):
            try:
                _rename_noreplace(tmp, output)
                return
            except FileExistsError:
                continue  # something appeared meanwhile: swap with it
        try:
            swapped = _renameat2(tmp, output, RENAME_EXCHANGE)
        except FileNotFoundError:
            continue  # the output vanished meanwhile
        if swapped:
            _remove(tmp)  # after the swap, tmp holds the previous checkpoint
        else:
            _replace_in_two_steps(tmp, output)
        return
    raise CalibInputError(f"{output} kept changing while this run tried to replace it; nothing was replaced. "
                          "Make sure no other process writes there, or choose another --output")


def _replace_in_two_steps(tmp: Path, output: Path) -> None:
    """Fallback without RENAME_EXCHANGE: move the old one aside, the new one in.
    A kill in between leaves ``.old-{pid}-*``, which the next run restores."""
    old = _temp_name(output, "old")
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old, output)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_directory(output: PathLike, overwrite: bool, protected: Iterable[PathLike | None] = ()) -> Iterator[Path]:
    """Yield a new private temporary folder beside ``output``; when the block
    ends normally its content becomes ``output`` (fsynced, with umask
    permissions), in one rename.

    Enter it before any heavy work: the folder is created on entry, so an
    unwritable output fails at once. Without ``overwrite`` the move fails if
    anything appeared at ``output`` meanwhile (another run). Any exception,
    KeyboardInterrupt included, removes the temporary folder and leaves an
    existing checkpoint untouched; a full disk becomes a CalibInputError.
    """
    output, protected = Path(output).expanduser().resolve(), tuple(protected)
    _refuse_protected(output, protected)
    recover_leftovers(output)
    check_output(output, overwrite, protected)
    tmp = _make_temp(output)
    try:
        yield tmp
        _seal(tmp)
        (_publish_overwrite if overwrite else _publish_exclusive)(tmp, output)
        _fsync_path(output.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        _remove(tmp)
        if exc.errno in DISK_FULL_ERRNOS:
            where = f" ({exc.filename})" if exc.filename else ""
            raise CalibInputError(f"disk full writing {output}: {exc.strerror}{where}; nothing was left behind. "
                                  "Free some space or choose an --output on another disk") from exc
        raise
    except BaseException:
        _remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# safetensors, byte for byte reproducible

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code


def _little_endian_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian bytes, without a copy on little-endian hosts."""
    flat = tensor.reshape(-1).view(torch.uint8)
    if sys.byteorder != "little" and tensor.element_size() > 1:
        flat = flat.view(-1, tensor.element_size()).flip(-1).reshape(-1)
    return memoryview(flat.numpy())


def safetensors_header(tensors: list[tuple[str, torch.Tensor]], metadata: Mapping[str, str] | None) -> bytes:
    """The JSON header, space-padded to a multiple of 8 bytes: ``__metadata__``
    first with sorted keys, then the tensors in the given (data) order."""
    header: dict[str, object] = {}
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; not so for {bad}")
        header["__metadata__"] = {key: metadata[key] for key in sorted(metadata)}
    offset = 0
    for name, tensor in tensors:
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def save_safetensors(tensors: Mapping[str, torch.Tensor], filename: PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file whose bytes depend only on its content.

    ``safetensors.torch.save_file`` orders ``__metadata__`` keys at random (a
    Rust HashMap), so identical runs gave different files. Here the header is
    sorted and tensors are laid out largest element first, then by name (so
    every tensor is aligned to its element size), each streamed to the file
    straight from its memory. The file is fsynced.
    """
    items = [(name, tensor.detach().to("cpu").contiguous()) for name, tensor in tensors.items()]
    items.sort(key=lambda item: (-item[1].element_size(), item[0]))
    header = safetensors_header(items, metadata)
    with open(filename, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for _, tensor in items:
            if tensor.numel():
                handle.write(_little_endian_bytes(tensor))
        handle.flush()
        os.fsync(handle.fileno())


save_file = save_safetensors  # the name write_tensors calls (a test replaces it to interrupt a write)


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
    folder = Path(folder)
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
        if hasattr(tensor, "load"):  # a calib.checkpoint.RawTensor: its bytes, unchanged
            tensor = tensor.load()
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


@dataclass(frozen=True)
class TensorSpec:
    """What a shard's header needs of a tensor before its data exists: dtype and shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def shard_plan(layout: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_size: int) -> list[list[int]]:
    """Indices of ``layout`` per shard, by the rule :func:`write_tensors` follows
    for the same stream: tensors in order, a new shard when the next tensor would
    take the current one past ``max_shard_size`` (a larger tensor alone)."""
    shards: list[list[int]] = []
    size = 0
    for i, (_, dtype, shape) in enumerate(layout):
        nbytes = TensorSpec(dtype, tuple(shape)).numel() * TensorSpec(dtype, ()).element_size()
        if shards and shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        if not shards:
            shards.append([])
        shards[-1].append(i)
        size += nbytes
    return shards


class PlannedWriter:
    """A checkpoint written tensor by tensor into shards laid out in advance.

    :func:`write_tensors` must hold a whole shard in memory until it knows every
    tensor of its header. When the stream's names, dtypes and shapes are known
    before any tensor is computed (``layout``, in stream order), the shards,
    headers and offsets are fixed up front: each file gets its header at once,
    and every tensor is written at its own offset when it arrives, in any order
    and from any thread (``pwrite``); a tensor copied unchanged from a
    safetensors source goes file to file in the kernel. Memory: the tensors
    being computed, nothing else.

    The files are byte for byte those :func:`write_tensors` writes for the same
    stream (same shard split, same header, same data order). :meth:`close`
    checks that every tensor was written, fsyncs, names the shards and writes
    the index; a tensor whose dtype or shape differs from the layout is an error.
    """

    def __init__(self, folder: PathLike, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str], max_shard_size: int) -> None:
        import threading

        if not layout:
            raise RuntimeError("no tensors to write")
        self.folder = Path(folder)
        names = [name for name, _, _ in layout]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise RuntimeError(f"tensors written twice: {twice[:5]}")
        metadata = {"format": "pt", **metadata}
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (shard, offset, spec)
        self._fds: list[int] = []
        self._temp: list[Path] = []
        self._shards: list[list[str]] = []
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self.total_bytes = 0
        try:
            for number, indices in enumerate(shard_plan(layout, max_shard_size)):
                items = [(layout[i][0], TensorSpec(layout[i][1], tuple(layout[i][2]))) for i in indices]
                self._shards.append([name for name, _ in items])
                items.sort(key=lambda item: (-item[1].element_size(), item[0]))  # save_safetensors' data order
                header = safetensors_header(items, metadata)
                path = self.folder / f"shard-{number:05d}.tmp"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
                self._fds.append(fd)
                self._temp.append(path)
                offset = 8 + len(header)
                for name, spec in items:
                    self._where[name] = (number, offset, spec)
                    offset += spec.numel() * spec.element_size()
                    self.total_bytes += spec.numel() * spec.element_size()
                os.pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
                os.ftruncate(fd, offset)
        except BaseException:
            self._close_fds()
            raise

    def write(self, name: str, tensor) -> None:
        """Write one tensor of the layout (a ``torch.Tensor`` or a
        :class:`calib.checkpoint.RawTensor`); thread-safe."""
        place = self._where.get(name)
        if place is None:
            raise RuntimeError(f"tensor {name} is not in the planned layout")
        shard, offset, spec = place
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, but the layout planned "
                               f"{spec.dtype} {list(spec.shape)}")
        with self._lock:
            if name in self._written:
                raise RuntimeError(f"tensor {name} written twice")
            self._written.add(name)
        if hasattr(tensor, "write_to"):
            tensor.write_to(self._fds[shard], offset)
        elif tensor.numel():
            from calib.checkpoint import pwrite_all

            pwrite_all(self._fds[shard], _little_endian_bytes(tensor.detach().to("cpu").contiguous()), offset)

    def close(self) -> WrittenCheckpoint:
        """Check, fsync and name the shards; write the index. Returns what was written."""
        missing = [name for name in self._where if name not in self._written]
        if missing:
            self._close_fds()
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[:5]}")
        for fd in self._fds:
            os.fsync(fd)
        self._close_fds()
        result = WrittenCheckpoint(total_bytes=self.total_bytes, num_tensors=len(self._where))
        for _, _, spec in self._where.values():
            key = str(spec.dtype).removeprefix("torch.")
            result.dtypes[key] = result.dtypes.get(key, 0) + 1
        count = len(self._temp)
        weight_map = {}
        for i, path in enumerate(self._temp):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / final)
            result.files.append(final)
            weight_map.update({name: final for name in self._shards[i]})
        if count > 1:
            index = {"metadata": {"total_size": result.total_bytes},
                     "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return result

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def source_config_dict(config: dict, quantization_config: dict, dtype: torch.dtype,
                       source_name: str | None = None) -> dict:
    """:func:`model_config_dict` for a model that was never built (a config.json
    transformers does not know): the source's config.json as read, with our
    ``quantization_config``, ``dtype`` and public ``_name_or_path``."""
    config = dict(config)
    config.pop("quantization_config", None)
    config["quantization_config"] = quantization_config
    _add_kv_heads(config)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    if source_name:
        config["_name_or_path"] = source_name if looks_like_hub_id(source_name) else Path(source_name).name
    elif not looks_like_hub_id(str(config.get("_name_or_path") or "")):
        config.pop("_name_or_path", None)
    return config


# ---------------------------------------------------------------------------------------------
# config.json and side files

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def looks_like_hub_id(value: str) -> bool:
    """``org/name`` or ``name``, not a path on this machine."""
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value and not Path(value).expanduser().exists()


def model_config_dict(model, quantization_config: dict, source_name: str | None = None) -> dict:
    """The model's config.json content with our ``quantization_config``.

    Any previous ``quantization_config`` (e.g. GGUF's, after dequantizing on
    load) is replaced: the weights we write are what the new one describes.
    ``architectures`` always names the model class (a GGUF-loaded config has
    none, and vLLM and ``calib.load`` need it); ``_name_or_path`` is
    ``source_name`` (a hub id, or a local path's last part) or a hub id already
    there, never a path on this machine.
    """
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = quantization_config
    _add_kv_heads(config)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    if source_name:  # a hub id as given; of a local path only its last part
        config["_name_or_path"] = source_name if looks_like_hub_id(source_name) else Path(source_name).name
    elif not looks_like_hub_id(str(config.get("_name_or_path") or "")):
        config.pop("_name_or_path", None)
    return config


def kv_heads(config: dict) -> int | None:
    """The number of key/value heads of a config.json that does not name
    ``num_key_value_heads`` (OPT, GPT-NeoX, GPT-2, Falcon), or None when it
    does or no head count is there."""
    if "num_key_value_heads" in config:
        return None
    heads = config.get("num_attention_heads", config.get("n_head"))
    if config.get("model_type") == "falcon":
        if config.get("new_decoder_architecture"):
            return config.get("num_kv_heads", heads)
        if config.get("multi_query", True):
            return 1
    return heads if isinstance(heads, int) else None


def _add_kv_heads(config: dict) -> None:
    """A checkpoint with a ``kv_cache_scheme`` names its key/value head count:
    compressed-tensors sizes the k/v scales of a reloaded model from
    ``num_key_value_heads`` and stops when a config (OPT's) has none. The value
    is the one the architecture already implies, so other readers (vLLM reads
    the family's own fields first) are unaffected."""
    if config["quantization_config"].get("kv_cache_scheme") is None:
        return
    heads = kv_heads(config)
    if heads is not None:
        config["num_key_value_heads"] = heads


def write_side_files(folder: Path, model, tokenizer, config: dict, recipe_yaml: str) -> None:
    folder = Path(folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    (folder / "recipe.yaml").write_text(recipe_yaml)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(str(folder))
