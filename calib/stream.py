"""Quantize and export in checkpoint space: the source's tensors, one at a time,
under the source's names.

Phase 1 (calibration, module space: :func:`calib.calibration.calibrate`, or the
sequential executor) leaves observers and, for SmoothQuant, *transforms*. Phase
2 is here: :func:`quantized_stream` reads the **source** checkpoint tensor by
tensor (a :class:`~calib.checkpoint.TensorSource`), maps each name to module
space (:class:`~calib.checkpoint.NameMap`), applies the tensor's transforms,
quantizes the targeted weights with the recipe's weight scheme, attaches the
input and KV scales from the observers, and yields ``(checkpoint name,
tensor)`` in source order, KV scales last. The math is
:func:`calib.quantize._quantize_layer`'s, so the tensors are bit for bit those
the in-memory path computes from the loaded (and smoothed) model.

Tensors nothing changes are copied as they are: same dtype, same bytes (a
:class:`~calib.checkpoint.RawTensor` when the writer can copy file to file).
``dtype`` (``--dtype bfloat16`` on an fp32 source) casts every float16/
bfloat16/float32/float64 tensor first, as loading the model in that dtype
does; the transforms then apply to the cast tensor, as SmoothQuant rescales the
model loaded in that dtype.

:func:`write_checkpoint` writes such a stream through
:class:`calib.export.PlannedWriter` (layout fixed up front, every tensor
written at its offset: nothing held but the tensors being computed, optional
worker threads, the same bytes whatever the timing). :func:`quantize_data_free`
is the path for recipes that need no calibration: it never builds the model,
plans on the ``meta``-device skeleton (or, for an architecture transformers does
not know, on the tensor names: :func:`plan_by_name`) and streams the shards.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from calib import qmath
from calib.checkpoint import NameMap, SafetensorsSource, TensorSource, name_map_for
from calib.errors import CalibInputError
from calib.observers import Observer
from calib.quantize import (Plan, QuantizeResult, _quantize_layer, activation_amax, fused_weight_amax, plan_for,
                            shares_fused_scale)
from calib.recipe import Recipe

log = logging.getLogger(__name__)

CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SHOWN = 10

# ---------------------------------------------------------------------------------------------
# Transforms: SmoothQuant's rescaling as data


@dataclass(frozen=True, eq=False)
class Rescale:
    """``t / s`` (``divide``) or ``t * s`` along dimension ``dim``, ``s`` cast to the
    tensor's dtype first: exactly what :func:`calib.algorithms.smoothquant.apply_smoothing`
    does in place to a producer (dim 0 divided) and its consumers (dim 1 multiplied)."""

    scales: torch.Tensor
    dim: int
    divide: bool = False

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        return rescale_channels(tensor, self.scales, self.dim, self.divide)


def rescale_channels(tensor: torch.Tensor, scales: torch.Tensor, dim: int, divide: bool = False) -> torch.Tensor:
    """A new tensor: ``tensor`` with channel ``j`` along ``dim`` divided (or
    multiplied) by ``scales[j]``. The same elementwise operation in the same
    dtype as the in-place ``div_``/``mul_`` of SmoothQuant, so bit-identical."""
    shape = [1] * tensor.dim()
    shape[dim] = -1
    s = scales.to(device=tensor.device).to(tensor.dtype).reshape(shape)
    return tensor / s if divide else tensor * s


def smoothing_transforms(model: nn.Module, pair, scales: torch.Tensor) -> dict[str, list[Rescale]]:
    """The transforms that reproduce ``apply_smoothing(model, pair, scales)`` on source
    tensors: module-space parameter name -> rescalings, in application order.
    ``model`` may be the ``meta`` skeleton (only whether the producer has a bias is read)."""
    s = scales.detach().to("cpu", torch.float32).clone()
    rows = pair.producer_scales(s)
    out: dict[str, list[Rescale]] = {f"{pair.producer}.weight": [Rescale(rows, 0, divide=True)]}
    if getattr(model.get_submodule(pair.producer), "bias", None) is not None:
        out[f"{pair.producer}.bias"] = [Rescale(rows, 0, divide=True)]
    for name in pair.consumers:
        out[f"{name}.weight"] = [Rescale(s, 1)]
    return out


def merge_transforms(into: dict[str, list], new: Mapping[str, list]) -> dict[str, list]:
    """Append ``new``'s transforms after those already in ``into`` (order matters in floating point)."""
    for key, items in new.items():
        into.setdefault(key, []).extend(items)
    return into


def _as_list(transform) -> list:
    return list(transform) if isinstance(transform, list) else [transform]


def apply_transform(tensor: torch.Tensor, transform) -> torch.Tensor:
    """One transform: an object with ``apply(tensor)`` (:class:`Rescale`, the
    sequential executor's ``ChannelScale``), a callable, or ``(dim, scales)``
    (multiply along ``dim``)."""
    if hasattr(transform, "apply"):
        return transform.apply(tensor)
    if callable(transform):
        return transform(tensor)
    if isinstance(transform, tuple) and len(transform) == 2:
        dim, scales = transform
        return rescale_channels(tensor, scales, int(dim))
    raise TypeError(f"not a transform: {transform!r}")


# ---------------------------------------------------------------------------------------------
# The stream


@dataclass
class _Item:
    index: int
    kind: str  # "copy" | "cast" | "quantize" | "kv"
    source_name: str | None  # checkpoint name read (None for kv)
    module_key: str | None  # its module-space name (None: a tensor the model does not load, or kv)
    target: str | None  # module name: the Linear quantized, or the attention module (kv)
    dtype: torch.dtype | None  # output dtype of the tensor (cast) / of its scales
    outputs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    transforms: list = field(default_factory=list)
    layer_idx: int | None = None


def _names(items) -> str:
    items = list(items)
    return ", ".join(map(str, items[:SHOWN])) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


class CheckpointQuantizer:
    """The work of one quantized checkpoint, planned before any tensor is read:
    its items (one per source tensor, one per attention layer's KV scales) and
    their outputs (names, dtypes, shapes: the layout a writer needs up front)."""

    def __init__(self, source: TensorSource, name_map: NameMap, plan: Plan, recipe: Recipe,
                 input_observers: Mapping[str, Observer] | None = None,
                 kv_observers: Mapping[int, tuple[Observer, Observer]] | None = None,
                 transforms: Mapping[str, object] | None = None,
                 dtype: torch.dtype | Mapping[str, torch.dtype] | None = None, raw_copies: bool = False,
                 solved: Mapping[str, object] | None = None,
                 samples: Mapping[str, object] | None = None) -> None:
        self.source, self.name_map, self.plan, self.recipe = source, name_map, plan, recipe
        self.solved = dict(solved or {})  # module name -> calib.algorithms.gptq.Solved
        self.samples = dict(samples or {})  # module name -> calib.observers.RowSampler (output error)
        self.input_observers = dict(input_observers or {})
        self.kv_observers = dict(kv_observers or {})
        self.transforms = {k: _as_list(v) for k, v in (transforms or {}).items()}
        self.dtype = dtype
        self.raw_copies = raw_copies
        self.input_amax: dict[str, torch.Tensor] = {}
        self.shared_amax: dict[str, torch.Tensor] = {}
        self.items = self._plan_items()

    # --- planning

    def out_dtype(self, dtype: torch.dtype, key: str | None = None) -> torch.dtype:
        """The dtype a stored tensor has in the model: ``self.dtype`` (one dtype for
        every float tensor, or module key -> dtype), else as stored."""
        target = self.dtype.get(key) if isinstance(self.dtype, Mapping) else self.dtype
        return target if target in CASTABLE and dtype in CASTABLE else dtype

    def _plan_items(self) -> list[_Item]:
        plan, nm = self.plan, self.name_map
        weight_of = {f"{m}.weight": m for m in plan.targets}
        stored = {nm.module_of(n) for n in self.source.names()}
        absent = [m for m in plan.targets if f"{m}.weight" not in stored]
        if absent:
            raise CalibInputError(f"{self.source.where} stores no weight of its own for targeted modules "
                                  f"{_names(absent)} (tied to another tensor?): ignore them in the recipe")
        unused = sorted(set(self.transforms) - stored)
        if unused:
            raise CalibInputError(f"transforms given for tensors {self.source.where} does not store: {_names(unused)}")
        items: list[_Item] = []
        for name in self.source.names():
            sdtype, shape = self.source.info(name)
            key = nm.module_of(name)
            dtype = self.out_dtype(sdtype, key) if key is not None else sdtype  # dropped on load: as stored
            transforms = self.transforms.get(key, []) if key is not None else []
            target = weight_of.get(key) if key is not None else None
            if target is not None:
                if len(shape) != 2:
                    raise CalibInputError(f"{name} is targeted as a Linear weight but has shape {list(shape)}")
                prefix = name[: -len(".weight")] if name.endswith(".weight") else nm.checkpoint_prefix(target)
                outputs = self._weight_outputs(prefix, shape, dtype)
                items.append(_Item(len(items), "quantize", name, key, target, dtype, outputs, transforms))
            elif transforms or dtype != sdtype:
                items.append(_Item(len(items), "cast", name, key, None, dtype, [(name, dtype, shape)], transforms))
            else:
                items.append(_Item(len(items), "copy", name, key, None, dtype, [(name, dtype, shape)]))
        for layer_idx, attn in plan.attention.items():
            first = nm.first_parameter(attn)
            dtype = (self.out_dtype(self.source.info(first)[0], nm.module_of(first)) if first is not None
                     else torch.float32)
            prefix = nm.checkpoint_prefix(attn)
            outputs = [(f"{prefix}.k_scale", dtype, (1,)), (f"{prefix}.v_scale", dtype, (1,))]
            items.append(_Item(len(items), "kv", None, None, attn, dtype, outputs, layer_idx=layer_idx))
        seen: set[str] = set()
        clash = [n for item in items for n, _, _ in item.outputs if n in seen or seen.add(n)]
        if clash:
            raise CalibInputError(f"{self.source.where} already holds tensors calib would write: {_names(clash)} "
                                  "(an already quantized checkpoint?); quantize the original weights instead")
        return items

    def _weight_outputs(self, prefix: str, shape: tuple[int, ...], dtype: torch.dtype) -> list:
        w, a = self.recipe.weights, self.recipe.input_activations
        out, cols = shape
        scale_shape = {"tensor": (1,), "channel": (out, 1)}.get(w.strategy)
        if w.strategy == "group":
            scale_shape = (out, cols // w.group_size)
        if self.recipe.format == "pack-quantized":
            per_word = 32 // w.num_bits
            outputs = [(f"{prefix}.weight_packed", torch.int32, (out, cols // per_word)),
                       (f"{prefix}.weight_scale", dtype, scale_shape),
                       (f"{prefix}.weight_shape", torch.int64, (2,))]
        else:
            qdtype = qmath.FP8_DTYPE if w.is_fp8 else torch.int8
            outputs = [(f"{prefix}.weight", qdtype, tuple(shape)), (f"{prefix}.weight_scale", dtype, scale_shape)]
        if a is not None and not a.dynamic:
            outputs.append((f"{prefix}.input_scale", dtype, (1,)))
            if not a.symmetric:
                outputs.append((f"{prefix}.input_zero_point", torch.int8, (1,)))
        return outputs

    def layout(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [output for item in self.items for output in item.outputs]

    # --- computing

    def reads(self, item: _Item) -> bool:
        """Whether computing ``item`` reads its source tensor into memory (a raw copy does not)."""
        return item.kind in ("cast", "quantize") or (item.kind == "copy" and not self.raw_copies)

    def load(self, item: _Item, stored: torch.Tensor | None = None) -> torch.Tensor:
        """A source tensor as the model in memory holds it: cast, then transformed
        (``stored``: the source tensor, already read)."""
        tensor = stored if stored is not None else self.source.get(item.source_name)
        if tensor.dtype != item.dtype:
            tensor = tensor.to(item.dtype)
        for transform in item.transforms:
            tensor = apply_transform(tensor, transform)
        return tensor

    def prepare(self, result: QuantizeResult) -> None:
        """What needs more than one tensor, before the first is written: the input
        ranges (fused siblings share one) and FP8 per-tensor weight scales shared
        by fused groups (their weights are read once more, for ``max |w|`` only)."""
        w_args, a_args = self.recipe.weights, self.recipe.input_activations
        if a_args is not None and not a_args.dynamic:
            self.input_amax = activation_amax(self.plan, self.input_observers, a_args, result)
        if shares_fused_scale(w_args) and self.plan.fused:
            by_target = {item.target: item for item in self.items if item.kind == "quantize"}
            for group in self.plan.fused:
                weights = [self.load(by_target[member]) for member in group]
                self.shared_amax.update(fused_weight_amax(w_args, group, weights))

    def compute(self, item: _Item, result: QuantizeResult,
                stored: torch.Tensor | None = None) -> list[tuple[str, torch.Tensor]]:
        """The item's output tensors (``result`` gets its layer statistics;
        ``stored``: its source tensor, already read)."""
        if item.kind == "copy":
            if self.raw_copies:
                return [(item.source_name, self.source.raw(item.source_name))]
            return [(item.source_name, stored if stored is not None else self.source.get(item.source_name))]
        if item.kind == "cast":
            return [(item.source_name, self.load(item, stored))]
        start = time.perf_counter()
        if item.kind == "quantize":
            weight = self.load(item, stored)
            prefix = item.outputs[0][0].rpartition(".")[0]
            tensors = list(_quantize_layer(item.target, weight, self.recipe, self.input_amax, self.shared_amax,
                                           self.input_observers, result, prefix=prefix, solved=self.solved,
                                           samples=self.samples))
        else:
            tensors = self._kv_scales(item, result)
        result.seconds += time.perf_counter() - start
        return tensors

    def _kv_scales(self, item: _Item, result: QuantizeResult) -> list[tuple[str, torch.Tensor]]:
        observers = self.kv_observers.get(item.layer_idx)
        if observers is None or not observers[0].observed:
            raise CalibInputError(f"{item.target}: no key/value states were observed, so no KV-cache scale. "
                                  "Calibrate with at least one sample.")
        scales, tensors = {}, []
        for (name, dtype, _), which, obs in zip(item.outputs, ("k", "v"), observers):
            scale = qmath.storage_scale(qmath.symmetric_scale(obs.absmax().reshape(1), qmath.FP8_MAX), dtype)
            scales[f"{which}_scale"] = float(scale)
            tensors.append((name, scale))
        result.kv_scales[item.target] = scales
        return tensors


def quantized_stream(
    source: TensorSource,
    name_map: NameMap,
    plan: Plan,
    recipe: Recipe,
    input_observers: Mapping[str, Observer] | None = None,
    kv_observers: Mapping[int, tuple[Observer, Observer]] | None = None,
    transforms: Mapping[str, object] | None = None,
    dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    result: QuantizeResult | None = None,
    raw_copies: bool = False,
    solved: Mapping[str, object] | None = None,
    samples: Mapping[str, object] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors under the source's names, in source order (KV
    scales last), quantized where ``plan`` says.

    ``input_observers``/``kv_observers``/``plan`` come from calibration (module
    space). ``transforms``: module-space parameter name -> a transform or a list
    applied in order (:class:`Rescale`, any object with ``apply``, a callable,
    or ``(dim, scales)``), applied to the source tensor after the ``dtype`` cast
    and before anything else. ``dtype``: one dtype for every float16/bfloat16/
    float32/float64 tensor, or module key -> dtype
    (:func:`calib.checkpoint.module_dtypes` of the model that was calibrated:
    exact also for modules a model keeps in float32), or None (as stored).
    Untouched tensors are yielded as read (or as a
    :class:`~calib.checkpoint.RawTensor` with ``raw_copies``). Errors (a module
    that saw no tokens, NaN/Inf weights of fused groups) are raised before the
    first tensor is yielded.
    """
    result = result if result is not None else QuantizeResult()
    work = CheckpointQuantizer(source, name_map, plan, recipe, input_observers, kv_observers, transforms, dtype,
                               raw_copies, solved, samples)
    work.prepare(result)
    for item in work.items:
        yield from work.compute(item, result)


# ---------------------------------------------------------------------------------------------
# Writing


def default_workers() -> int:
    """Threads for quantizing tensors in parallel: torch releases the GIL, so up
    to the cores this process may use (at most 8: reading, not math, bounds it then)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def write_checkpoint(folder: str | Path, source: TensorSource, name_map: NameMap, plan: Plan, recipe: Recipe,
                     input_observers: Mapping[str, Observer] | None = None,
                     kv_observers: Mapping[int, tuple[Observer, Observer]] | None = None,
                     transforms: Mapping[str, object] | None = None,
                     dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
                     metadata: Mapping[str, str] | None = None, max_shard_size: int = 5 * 10**9,
                     workers: int = 1, result: QuantizeResult | None = None, progress: bool = False,
                     solved: Mapping[str, object] | None = None,
                     samples: Mapping[str, object] | None = None, ranks=None):
    """Write :func:`quantized_stream`'s tensors into ``folder`` (shards + index)
    with :class:`calib.export.PlannedWriter`: the layout is fixed first (its size
    checked against the free space), then each tensor is computed and written at
    its offset, by ``workers`` threads. Memory: about ``workers`` tensors. The
    files are byte for byte what :func:`calib.export.write_tensors` writes for
    the same stream, whatever the thread timing; ``result`` gets the layers in
    stream order. Returns the :class:`calib.export.WrittenCheckpoint`.

    ``ranks`` (a :class:`calib.distributed.Group`, several processes): the
    quantized weights are shared out among the ranks (:func:`calib.distributed.owner_of`,
    by size); each rank quantizes its own and sends them to rank 0, which alone
    writes (``folder`` is only read on rank 0; the others return None)."""
    from tqdm.auto import tqdm

    from calib.export import PlannedWriter, check_free_space

    result = result if result is not None else QuantizeResult()
    work = CheckpointQuantizer(source, name_map, plan, recipe, input_observers, kv_observers, transforms, dtype,
                               raw_copies=True, solved=solved, samples=samples)
    owners = _owners(work, ranks)
    main = ranks is None or ranks.is_main
    if main:
        layout = work.layout()
        check_free_space(folder, sum(torch.empty((), dtype=d).element_size() * _numel(s) for _, d, s in layout))
        work.prepare(result)
        writer = PlannedWriter(folder, layout, dict(metadata or {}), max_shard_size)
    else:
        work.prepare(QuantizeResult())
    if ranks is not None:
        try:
            ranks.check(None)  # a rank that failed before this point stops every rank, before any send
        except BaseException:
            if main:
                writer._close_fds()
            raise
        heavy = [owners[item.index] for item in work.items if item.kind == "quantize"]
        result.work_by_rank = {str(r): heavy.count(r) for r in range(ranks.world)}
    if not main:
        _send_items(work, owners, ranks)
        return None
    per_item = [QuantizeResult() for _ in work.items]

    buffers = _Buffers()

    def run(item: _Item, stored: torch.Tensor | None = None, buffer: torch.Tensor | None = None) -> None:
        try:
            for name, tensor in work.compute(item, per_item[item.index], stored):
                writer.write(name, tensor)
        finally:
            if buffer is not None:
                buffers.give(buffer)

    try:
        with tqdm(total=len(work.items), desc="quantize+write", unit="tensor", disable=not progress) as bar:
            if workers <= 1:
                for item in work.items:
                    if owners[item.index]:
                        _receive_item(work, item, owners[item.index], ranks, writer, per_item[item.index])
                    else:
                        run(item)
                    bar.update()
            else:
                # This thread reads the source tensors in file order (one sequential stream for the
                # disk) while the workers quantize and write; in flight: at most 2 per worker and
                # about PREFETCH_BYTES of read tensors (always at least one).
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="calib-write") as pool:
                    pending: dict = {}  # future -> bytes it holds
                    try:
                        for item in work.items:
                            if owners[item.index]:  # another rank quantizes it: receive it here, in order
                                _receive_item(work, item, owners[item.index], ranks, writer, per_item[item.index])
                                bar.update()
                                continue
                            size = _item_bytes(work, item)
                            while pending and (len(pending) >= 2 * workers
                                               or sum(pending.values()) + size > PREFETCH_BYTES):
                                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                                for future in done:
                                    pending.pop(future)
                                    future.result()
                                    bar.update()
                            stored = buffer = None
                            if work.reads(item) and hasattr(work.source, "read_into"):
                                buffer = buffers.take(size)
                                stored = work.source.read_into(item.source_name, buffer)
                            elif work.reads(item):
                                stored = work.source.get(item.source_name)
                            pending[pool.submit(run, item, stored, buffer)] = size
                            del stored, buffer
                        for future in list(pending):
                            future.result()
                            bar.update()
                    except BaseException:
                        for future in pending:
                            future.cancel()
                        raise
    except BaseException:
        writer._close_fds()
        raise
    for part in per_item:
        result.layers.extend(part.layers)
        result.kv_scales.update(part.kv_scales)
        result.seconds += part.seconds
    return writer.close()


def _owners(work: CheckpointQuantizer, ranks) -> list[int]:
    """Which rank computes each item: quantized weights shared out by size, everything
    else (copies, casts, KV scales) on rank 0, which writes."""
    from calib.distributed import owner_of

    owners = [0] * len(work.items)
    if ranks is None or ranks.world == 1:
        return owners
    heavy = [item for item in work.items if item.kind == "quantize"]
    for item, owner in zip(heavy, owner_of([_item_bytes(work, item) for item in heavy], ranks.world)):
        owners[item.index] = owner
    return owners


def _send_items(work: CheckpointQuantizer, owners: list[int], ranks) -> None:
    """A rank other than 0: quantize the items it owns, in order, and send each to
    rank 0 (a JSON header with the layer statistics, then each tensor's bytes);
    one send in flight while the next item is computed."""
    import json

    import torch.distributed as dist

    in_flight: list = []
    sending: list[torch.Tensor] = []
    for item in work.items:
        if owners[item.index] != ranks.rank:
            continue
        part = QuantizeResult()
        tensors = work.compute(item, part)
        header = json.dumps({"index": item.index, "names": [n for n, _ in tensors],
                             "layers": [asdict(layer) for layer in part.layers], "kv_scales": part.kv_scales,
                             "seconds": part.seconds}).encode()
        payload = [torch.tensor([len(header)], dtype=torch.int64),
                   torch.frombuffer(bytearray(header), dtype=torch.uint8)]
        payload += [t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in tensors]
        for handle in in_flight:  # the previous item's sends (their tensors are kept alive until now)
            handle.wait()
        sending = [ranks._t(t) for t in payload]
        in_flight = [dist.isend(t, dst=0) for t in sending]
    for handle in in_flight:
        handle.wait()


def _receive_item(work: CheckpointQuantizer, item: _Item, owner: int, ranks, writer, result: QuantizeResult) -> None:
    """Rank 0: ``item``'s tensors from the rank that quantized it, written in place."""
    import json

    import torch.distributed as dist

    from calib.quantize import LayerStats

    def receive(count: int, dtype: torch.dtype) -> torch.Tensor:  # (on the GPU with nccl)
        buffer = torch.empty(count, dtype=dtype, device=ranks.device)
        dist.recv(buffer, src=owner)
        return buffer.cpu()

    size = receive(1, torch.int64)
    raw = receive(int(size), torch.uint8)
    header = json.loads(bytes(raw.tolist()).decode())
    expected = [name for name, _, _ in item.outputs]
    if header["index"] != item.index or header["names"] != expected:
        raise RuntimeError(f"rank {owner} sent {header['names']} (item {header['index']}) where rank 0 expected "
                           f"{expected} (item {item.index}): the ranks disagree on the checkpoint's layout (a bug)")
    for name, dtype, shape in item.outputs:
        buffer = receive(_numel(shape) * torch.empty((), dtype=dtype).element_size(), torch.uint8)
        writer.write(name, buffer.view(dtype).reshape(shape))
    result.layers.extend(LayerStats(**layer) for layer in header["layers"])
    result.kv_scales.update(header["kv_scales"])
    result.seconds += float(header["seconds"])


PREFETCH_BYTES = 512 * 2**20  # source tensors read ahead of the workers, at most (one larger tensor alone)


class _Buffers:
    """Reusable read buffers (uint8), at most PREFETCH_BYTES of them kept."""

    def __init__(self) -> None:
        import threading

        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:  # the smallest that fits (tensors compare elementwise: pick by index)
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda b: -b.numel())
            while sum(b.numel() for b in self._free) > PREFETCH_BYTES and len(self._free) > 1:
                self._free.pop()  # the smallest goes


def _item_bytes(work: CheckpointQuantizer, item: _Item) -> int:
    if not work.reads(item):
        return 0
    dtype, shape = work.source.info(item.source_name)
    return _numel(shape) * dtype.itemsize


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checkpoint_ignore(recipe: Recipe, plan: Plan, name_map: NameMap | None = None) -> list[str]:
    """``quantization_config.ignore``: the recipe's entries and the modules left in
    high precision, as module names (what transformers + compressed-tensors and
    vLLM match), plus their checkpoint-space names where these differ (GPT-NeoX's
    ``lm_head`` is stored as ``embed_out``: both are listed)."""
    names = set(recipe.ignore) | set(plan.ignored)
    if name_map is not None:
        names |= {name_map.checkpoint_prefix(m) for m in plan.ignored}
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# Planning without transformers' model class: by tensor names

# Last name parts of embeddings and LM heads: never a target by class (only a
# recipe target naming them, exactly or by regex, quantizes them).
EMBEDDING_NAMES = frozenset({
    "embed_tokens", "embed_in", "embed_out", "embed_positions", "embeddings", "wte", "wpe", "word_embeddings",
    "position_embeddings", "token_type_embeddings", "tok_embeddings", "shared", "lm_head", "output",
})


class _Stored2D(nn.Module):
    """A 2-D tensor that is not a Linear target (an embedding or head found by name)."""


def plan_by_name(source: TensorSource, config: Mapping, recipe: Recipe) -> tuple[Plan, nn.Module]:
    """The recipe's plan from tensor names and shapes alone (an architecture
    transformers cannot build without running its code). The rule:

    * every 2-D floating-point tensor ``<module>.weight`` is the weight of a
      Linear ``<module>`` with ``in = shape[1]``, ``out = shape[0]``;
    * except embeddings and LM heads: ``<module>``'s last part is one of
      :data:`EMBEDDING_NAMES`, or a dimension equals ``vocab_size`` from
      config.json. Those are quantized only if a recipe target names them
      (exactly or with ``re:``), never by class;
    * 1-D tensors (norms, biases) and tensors of other ranks are never targets.

    Returns the plan and the module tree it was made on (``meta`` device).
    """
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    names = source.names()
    stored = set(names)
    root = nn.Module()
    # entries that name modules (a regex, or a module name) rather than a class (Linear)
    explicit = [p for p in recipe.targets if p.startswith("re:") or "." in p or p[:1].islower()]
    for name in names:
        dtype, shape = source.info(name)
        if not name.endswith(".weight") or len(shape) != 2 or dtype not in CASTABLE:
            continue
        module = name[: -len(".weight")]
        leaf = module.rpartition(".")[2]
        named = any(module == p or (p.startswith("re:") and re.match(p[3:], module)) for p in explicit)
        if (leaf in EMBEDDING_NAMES or vocab in shape) and not named:
            made = _Stored2D()
        else:
            made = nn.Linear(shape[1], shape[0], bias=f"{module}.bias" in stored, device="meta", dtype=dtype)
        _attach(root, module, made)
    return plan_for(root, recipe), root


def _attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent = root
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    if parts[-1] in parent._modules:
        raise CalibInputError(f"tensor names nest inside {dotted}.weight's module; cannot plan by names")
    parent.add_module(parts[-1], module)


# ---------------------------------------------------------------------------------------------
# The data-free path


@dataclass
class StreamSummary:
    """What a streamed export wrote (the report's export figures)."""

    output: str
    files: list[str]
    size_after_bytes: int
    num_tensors: int
    quantize_s: float  # quantizing and writing the tensors (they overlap, in worker threads): wall time
    export_s: float  # the rest: planning, config and side files
    planned_on: str  # "skeleton" (transformers' model class on meta) or "names" (plan_by_name)
    model_class: str
    ignore: list[str]
    result: QuantizeResult
    unmatched: list[str] = field(default_factory=list)  # recipe entries that matched no module
    plan: Plan | None = None

    def as_report(self) -> dict:
        return {
            "output": self.output,
            "files": self.files,
            "size_after_bytes": self.size_after_bytes,
            "layers_quantized": len(self.result.layers),
            "unobserved_modules": self.result.unobserved,
            "kv_scales": self.result.kv_scales,
            "layers": [asdict(layer) for layer in self.result.layers],
            "planned_on": self.planned_on,
        }


def build_skeleton(folder: Path, config: Mapping, dtype: torch.dtype, trust_remote_code: bool = False):
    """The model on the ``meta`` device (no memory, no weights), or None when
    transformers cannot build it (unknown ``model_type``, or custom code not
    trusted). The class is the one config.json's ``architectures`` names when
    transformers has it, else the Auto class calib loads with."""
    import transformers

    from calib.models import _is_causal_lm, _name_architecture

    model_type = config.get("model_type")
    known = isinstance(model_type, str) and model_type in transformers.CONFIG_MAPPING
    if not known and not (config.get("auto_map") and trust_remote_code):
        return None
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("transformers cannot read %s/config.json (%s): planning by tensor names", folder, exc)
        return None
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    with torch.device("meta"):
        if (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
                and isinstance(hf_config, cls.config_class)):
            skeleton = cls._from_config(hf_config, dtype=dtype)
        else:
            auto = transformers.AutoModelForCausalLM if _is_causal_lm(hf_config) else transformers.AutoModel
            skeleton = auto.from_config(hf_config, trust_remote_code=trust_remote_code, dtype=dtype)
    _name_architecture(skeleton)
    from calib.moe import unfuse_experts

    unfuse_experts(skeleton)  # MoE: per-expert Linear modules, named as the checkpoint names them
    if (folder / "generation_config.json").is_file() and getattr(skeleton, "can_generate", lambda: False)():
        try:
            skeleton.generation_config = transformers.GenerationConfig.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            log.warning("could not read %s/generation_config.json (%s): not copied", folder, exc)
    return skeleton


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "tekken.json")


def quantize_data_free(model_dir: str | Path, recipe: Recipe | str, output_folder: str | Path, *,
                       dtype: str | torch.dtype | None = "auto", max_shard_size: str | int = "5GB",
                       metadata: Mapping[str, str] | None = None, tokenizer=None, source_name: str | None = None,
                       trust_remote_code: bool = False, workers: int | None = None,
                       progress: bool = False, ranks=None) -> StreamSummary | None:
    """Quantize a local safetensors model with a recipe that needs no calibration
    (fp8-dynamic, int8-w8a8-dynamic, int8-w8a16, int4-w4a16) into
    ``output_folder`` (an existing, empty folder: the caller's temporary folder
    of :func:`calib.export.atomic_directory`) without ever building the model.

    Plans on the ``meta`` skeleton (or by tensor names when transformers does not
    know the architecture), streams the source tensor by tensor with ``workers``
    threads, writes config.json (with ``quantization_config``), recipe.yaml, the
    tokenizer (``tokenizer`` if given, else loaded from ``model_dir``, else its
    files copied as they are) and the generation config. ``dtype``: "auto"/None
    keeps every tensor's stored dtype; a dtype casts float tensors as loading
    in that dtype would. ``metadata``: the provenance for each shard's header.
    Writes the same tensors, in the same files, as the in-memory path.
    ``ranks``: several processes share the quantizing, rank 0 writes
    (:func:`write_checkpoint`); the other ranks return None.
    """
    from calib.export import model_config_dict, parse_size, source_config_dict, write_side_files
    from calib.models import _read_config_json, _torch_dtype
    from calib.recipe import load_recipe

    start = time.perf_counter()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if recipe.needs_calibration:
        raise CalibInputError(f"recipe {recipe.name!r} computes scales from calibration data (static activations, "
                              "KV cache or SmoothQuant); the data-free path serves only recipes that need none")
    cast = dtype if isinstance(dtype, torch.dtype) or dtype is None else _torch_dtype(dtype)
    cast = None if cast == "auto" else cast
    shard_bytes = parse_size(max_shard_size)
    folder, output = Path(model_dir), Path(output_folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CalibInputError(f"{folder} has no config.json: pass a Hugging Face model folder")
    config = _read_config_json(config_path)
    quantized = (config.get("quantization_config") or {}).get("quant_method")
    if quantized:
        raise CalibInputError(f"{folder} is already quantized (quantization_config.quant_method {quantized!r}); "
                              "calib quantizes unquantized checkpoints: pass the original model")
    source = SafetensorsSource(folder)
    try:
        stored = next((source.info(n)[0] for n in source.names() if source.info(n)[0] in CASTABLE), torch.float32)
        model_dtype = cast or stored
        skeleton = build_skeleton(folder, config, model_dtype, trust_remote_code)
        if skeleton is not None:
            plan = plan_for(skeleton, recipe)
            name_map = name_map_for(skeleton, source)
            planned_on, model_class = "skeleton", type(skeleton).__name__
        else:
            log.warning("transformers cannot build %s (model_type %r): targets found by tensor name (2-D *.weight "
                        "tensors, embeddings and heads excluded)", folder, config.get("model_type"))
            plan, _ = plan_by_name(source, config, recipe)
            name_map = NameMap.identity(source.names())
            planned_on, model_class = "names", str((config.get("architectures") or ["?"])[0])
        ignore = checkpoint_ignore(recipe, plan, name_map)
        result = QuantizeResult()
        write_start = time.perf_counter()
        written = write_checkpoint(output, source, name_map, plan, recipe, dtype=cast, metadata=metadata or {},
                                   max_shard_size=shard_bytes, workers=workers or default_workers(), result=result,
                                   progress=progress, ranks=ranks)
        write_s = time.perf_counter() - write_start
    finally:
        source.close()
    if written is None:  # another rank writes
        return None
    qconfig = recipe.to_quantization_config(ignore=ignore)
    if skeleton is not None:
        if tokenizer is None:
            tokenizer = _tokenizer_or_none(folder, trust_remote_code)
        config_out = model_config_dict(skeleton, qconfig, source_name=source_name or folder.name)
        write_side_files(output, skeleton, tokenizer, config_out, recipe.to_yaml())
    else:
        config_out = source_config_dict(config, qconfig, model_dtype, source_name=source_name or folder.name)
        write_side_files(output, None, tokenizer, config_out, recipe.to_yaml())
    if tokenizer is None:
        for name in TOKENIZER_FILES + (() if skeleton is not None else ("generation_config.json",)):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, output / name)
    elapsed = time.perf_counter() - start
    return StreamSummary(output=str(output), files=written.files, size_after_bytes=written.total_bytes,
                         num_tensors=written.num_tensors, quantize_s=write_s,
                         export_s=max(elapsed - write_s, 0.0), planned_on=planned_on, model_class=model_class,
                         ignore=ignore, result=result, unmatched=list(plan.unmatched), plan=plan)


def _tokenizer_or_none(folder: Path, trust_remote_code: bool):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info("no tokenizer loaded from %s (%s): its tokenizer files are copied as they are", folder, exc)
        return None


__all__ = [
    "CheckpointQuantizer", "Rescale", "StreamSummary", "apply_transform", "build_skeleton", "checkpoint_ignore",
    "default_workers", "merge_transforms", "plan_by_name", "quantize_data_free", "quantized_stream",
    "rescale_channels", "smoothing_transforms", "write_checkpoint",
]
