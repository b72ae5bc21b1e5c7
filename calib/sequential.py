"""Sequential calibration: a model larger than memory, one layer at a time.

The model is a skeleton on the ``meta`` device. A first forward with every
decoder layer replaced by a stand-in catches, per batch, the first layer's input
and the arguments the model hands each layer (the attention mask it built, the
rotary ``position_embeddings``, ``position_ids``, the cache), then stops. Then,
layer by layer::

    materialise the layer's weights -> run every batch through it with the
    observers attached -> keep its outputs as the next layer's inputs -> free it

so at most one layer's weights are real at any time (the embeddings and the
head count as layers: the catching forward holds the embeddings, a final
forward over the stored last hidden states holds the head, only when a
targeted module sits after the layers). The hidden states between layers stay
in memory, or go to safetensors files in a folder the caller gives when they
would not fit the memory budget.

The observers see exactly what :func:`calib.calibration.calibrate` shows them
on the loaded model: the same batches, the same masks, the same tensors, bit
for bit. SmoothQuant needs the unsmoothed model's channel ranges for every
pair, then observes the smoothed model; here both run in the same walk as two
streams of hidden states: per layer, the unsmoothed stream collects the ranges,
the layer is rescaled exactly as ``apply_smoothing`` rescales it, and the
smoothed stream is observed. Each layer is read once. The rescaling is returned
as data (:class:`ChannelScale` per tensor) for the writer that re-reads the
weights from the source.

Calibration only: quantizing and writing are done afterwards by the streaming
writer, from the returned :class:`SequentialCalibration`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from calib.algorithms.smoothquant import (SmoothPair, apply_smoothing, describe, search_rows, smooth_pair,
                                          smoothing_pairs)
from calib import qmath
from calib import distributed
from calib.calibration import Calibration, _forward_kwargs, _reduce_over_ranks, all_experts_observed, input_groups, \
    local_batches, sample_groups
from calib.data import CalibrationSet
from calib.errors import CalibInputError
from calib.estimate import RUNTIME_OVERHEAD, forward_workspace_bytes, human
from calib.hooks import InputGroup, _positions_mask, observe, observing_cache
from calib.in_order import DONE, FAILED, Baton, Stage, one_sample, plan_stages
from calib.layers import DecoderLayers, LoadWeights, Units, canonical_names, find_decoder_layers, materialise, \
    tensor_slots, unit_bytes, units
from calib.observers import ChannelMaxObserver, NonFiniteInput, Observer
from calib.quantize import Plan, plan_for
from calib.recipe import Recipe

log = logging.getLogger(__name__)

SPILL_PREFIX = "calib-spill-"


class _Stop(Exception):
    """Raised by a stand-in to end a forward once it has what it needs."""


def _stop(module: nn.Module, args: tuple) -> None:
    raise _Stop


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _return_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the system. Without it the
    blocks a released layer leaves between live hidden states stay in the
    process, and RSS creeps up layer after layer (~50 MB a layer on a 1B model)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ChannelScale:
    """A per-channel rescaling of one tensor: ``t / s`` (``divide``) or ``t * s``
    along dimension ``dim``, ``s`` cast to the tensor's dtype first.

    This is exactly what :func:`calib.algorithms.smoothquant.apply_smoothing` does
    to a producer (rows divided) and its consumers (columns multiplied), so a
    writer applying the transforms to the source weights gets the tensors the
    in-memory path would have exported, bit for bit.
    """

    scales: torch.Tensor  # float32, [channels], on the CPU
    dim: int
    divide: bool
    offset: float = 0.0  # a weight acting as offset + w (Gemma's norms): (offset + t) / s - offset

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        shape = [1] * tensor.dim()
        shape[self.dim] = -1
        s = self.scales.to(device=tensor.device, dtype=tensor.dtype).reshape(shape)
        if self.offset:
            return (tensor + self.offset) / s - self.offset
        return tensor / s if self.divide else tensor * s


def apply_transforms(tensor: torch.Tensor, transforms: list[ChannelScale]) -> torch.Tensor:
    """``tensor`` with its transforms applied in order (the order matters in floating point)."""
    for transform in transforms:
        tensor = transform.apply(tensor)
    return tensor


@dataclass
class SequentialCalibration(Calibration):
    """What :func:`calib.calibration.calibrate` returns, plus the SmoothQuant
    rescaling as data: parameter name (module space) -> transforms in order."""

    transforms: dict[str, list[ChannelScale]] = field(default_factory=dict)
    layers: int = 0
    spilled: bool = False
    # GPTQ: layers solved in order in one pass (calib.in_order), and those run in two passes, with why
    gptq_in_order: list[str] = field(default_factory=list)
    gptq_two_pass: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class SequentialMemory:
    """What sequential mode holds, by kind (bytes)."""

    unit_bytes: int  # the largest set of weights materialised at once (a layer, the embeddings, the head)
    hidden_bytes: int  # one stream's hidden states, all batches
    batch_hidden_bytes: int  # the largest batch's hidden states
    streams: int  # 2 with SmoothQuant (unsmoothed + smoothed), else 1
    extras_bytes: int  # attention masks and position tables kept per batch
    workspace_bytes: int  # one layer's forward over one batch
    runtime_bytes: int = RUNTIME_OVERHEAD
    # GPTQ: the rounded weights kept for the writer (1 byte a parameter), and one layer's
    # work (its Hessians, float32 in x in per group, and a copy of its float weights)
    solved_bytes: int = 0
    gptq_layer_bytes: int = 0

    def peak(self, spilled: bool) -> int:
        fixed = (self.runtime_bytes + self.unit_bytes + self.workspace_bytes + self.extras_bytes
                 + self.solved_bytes + self.gptq_layer_bytes)
        if spilled:  # one batch read ahead, one being run, one output being written
            return fixed + 3 * self.batch_hidden_bytes
        return fixed + self.streams * self.hidden_bytes + self.batch_hidden_bytes

    @property
    def minimum(self) -> int:
        return self.peak(spilled=True)


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _batch_shapes(data: CalibrationSet, batch_size: int) -> list[tuple[int, int, bool]]:
    """(rows, width, padded) per batch, in the order ``data.batches`` yields them."""
    lengths = sorted((int(s.numel()) for s in data.samples), reverse=True)
    shapes = []
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        shapes.append((len(chunk), chunk[0], chunk[0] != chunk[-1]))
    return shapes


def sequential_memory(model: nn.Module, data: CalibrationSet, batch_size: int, dtype: torch.dtype | None = None,
                      recipe: Recipe | None = None) -> SequentialMemory:
    """The memory figures of a sequential run, from the skeleton's shapes and the data."""
    dtype = dtype or _model_dtype(model)
    config = _text_config(model)
    element = dtype.itemsize
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    head_dim = int(getattr(config, "head_dim", 0) or hidden // max(int(getattr(config, "num_attention_heads", 1)), 1))
    shapes = _batch_shapes(data, batch_size)
    per_batch = [rows * width * hidden * element for rows, width, _ in shapes]
    # Masks: a 4-D one per batch (per distinct layer type) unless the kernel takes "causal" with no padding.
    kinds = len(set(getattr(config, "layer_types", None) or ["full"]))
    sdpa = str(getattr(config, "_attn_implementation", "sdpa") or "sdpa") in ("sdpa", "flash_attention_2")
    extras = 0
    for rows, width, padded in shapes:
        if padded or not sdpa:
            extras += kinds * rows * width * width * element
        extras += 2 * width * head_dim * element  # cos and sin
    targets = plan_for(model, recipe, warn=False).targets if recipe is not None else {}
    layout = find_decoder_layers(model)
    u = units(model, layout)
    slots = tensor_slots(model)
    sizes = [unit_bytes(model, u.prefix, dtype, slots)] + [unit_bytes(model, n, dtype, slots) for n in u.layers]
    if any(layout.layer_of(name) is None for name in targets):
        sizes.append(unit_bytes(model, u.tail, dtype, slots))
    streams = 2 if (recipe is not None and recipe.smoothquant is not None and _observes(recipe)
                    and recipe.gptq is None) else 1
    seq_len = max((width for _, width, _ in shapes), default=0)
    solved = gptq_layer = 0
    if recipe is not None and recipe.gptq is not None:
        in_layers = {n: m for n, m in targets.items() if layout.layer_of(n) is not None}
        solved = sum(m.weight.numel() for m in in_layers.values())
        per_layer: dict[int, int] = {}
        for name, module in in_layers.items():
            index = layout.layer_of(name)
            # a Hessian per target (fused siblings share one: an overestimate) + the weight's float copy
            # (float64, + a float32 batch product while accumulating)
            per_layer[index] = (per_layer.get(index, 0) + 12 * module.weight.shape[1] ** 2
                                + module.weight.numel() * element)
        gptq_layer = max(per_layer.values(), default=0)
    return SequentialMemory(unit_bytes=max(sizes), hidden_bytes=sum(per_batch),
                            batch_hidden_bytes=max(per_batch, default=0), streams=streams, extras_bytes=extras,
                            workspace_bytes=forward_workspace_bytes(config, batch_size, seq_len, element),
                            solved_bytes=solved, gptq_layer_bytes=gptq_layer)


def estimate_sequential_peak(model: nn.Module, data: CalibrationSet, batch_size: int,
                             dtype: torch.dtype | None = None, recipe: Recipe | None = None,
                             spilled: bool = False) -> int:
    """Estimated peak memory (bytes, runtime included, comparable with
    :func:`calib.estimate.in_memory_peak_bytes`) of sequential calibration,
    with the hidden states in memory or (``spilled``) on disk."""
    return sequential_memory(model, data, batch_size, dtype, recipe).peak(spilled)


def _observes(recipe: Recipe) -> bool:
    acts = recipe.input_activations
    return (acts is not None and not acts.dynamic) or recipe.kv_cache is not None


# --------------------------------------------------------------------------- hidden states


class _HiddenStates:
    """One stream's per-batch hidden states between layers: in memory, or one
    safetensors file per batch in ``folder`` (read one batch ahead)."""

    def __init__(self, count: int, folder: Path | None, tag: str, device: torch.device) -> None:
        self.count = count
        self.folder = folder
        self.tag = tag
        self.device = device
        self._memory: list[torch.Tensor | None] = [None] * count

    def _path(self, index: int) -> Path:
        return self.folder / f"{self.tag}-{index:06d}.safetensors"

    def put(self, index: int, tensor: torch.Tensor) -> None:
        if self.folder is None:
            self._memory[index] = tensor
            return
        from safetensors.torch import save_file

        save_file({"hidden": tensor.detach().to("cpu").contiguous()}, str(self._path(index)))

    def _read(self, index: int, keep: bool = False) -> torch.Tensor:
        from safetensors.torch import load_file

        path = self._path(index)
        tensor = load_file(str(path), device=str(self.device))["hidden"]
        if not keep:
            path.unlink()
        return tensor

    def peek(self, index: int) -> torch.Tensor:
        """Batch ``index``'s tensor, left in the store."""
        return self._memory[index] if self.folder is None else self._read(index, keep=True)

    def clear(self) -> None:
        self._memory = [None] * self.count
        if self.folder is not None:
            for index in range(self.count):
                self._path(index).unlink(missing_ok=True)

    def take_all(self, keep: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """Each batch's tensor once, in order; the store lets go of it (memory slot
        or file) unless ``keep`` (a pass whose outputs are not kept: GPTQ's Hessians)."""
        if self.folder is None:
            for index in range(self.count):
                tensor = self._memory[index]
                if not keep:
                    self._memory[index] = None
                yield index, tensor
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="calib-spill") as pool:
            ahead = pool.submit(self._read, 0, keep) if self.count else None
            for index in range(self.count):
                tensor = ahead.result()
                ahead = pool.submit(self._read, index + 1, keep) if index + 1 < self.count else None
                yield index, tensor


# --------------------------------------------------------------------------- stand-ins


@dataclass
class _Call:
    """The arguments the model passed one layer for one batch, its hidden states left out."""

    args: tuple
    kwargs: dict
    hidden_at: int | str

    def bind(self, hidden: torch.Tensor, fresh_cache: Callable[[], object]) -> tuple[tuple, dict]:
        """The arguments for a call on ``hidden``, with a fresh cache where the model passed one
        (a layer only appends its own keys/values to it; a fresh one keeps memory to one layer)."""
        from transformers.cache_utils import Cache

        args = [fresh_cache() if isinstance(a, Cache) else a for a in self.args]
        kwargs = {k: fresh_cache() if isinstance(v, Cache) else v for k, v in self.kwargs.items()}
        if isinstance(self.hidden_at, int):
            args[self.hidden_at] = hidden
        else:
            kwargs[self.hidden_at] = hidden
        return tuple(args), kwargs


def _split_call(index: int, args: tuple, kwargs: dict) -> tuple[torch.Tensor, _Call]:
    if args and torch.is_tensor(args[0]):
        return args[0], _Call(args=(None,) + tuple(args[1:]), kwargs=dict(kwargs), hidden_at=0)
    if torch.is_tensor(kwargs.get("hidden_states")):
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return kwargs["hidden_states"], _Call(args=tuple(args), kwargs={**rest, "hidden_states": None},
                                              hidden_at="hidden_states")
    raise CalibInputError(f"layer {index} is called without its hidden states as first argument or as "
                          "hidden_states=: sequential mode cannot feed it")


class _StandIn(nn.Module):
    """Takes a layer's place in its ModuleList for one forward; attribute reads the
    model makes of the layer (``attention_type``) reach the real one."""

    def __init__(self, index: int, layer: nn.Module, on_call: Callable) -> None:
        super().__init__()
        self.__dict__["_real"] = layer  # not a submodule: named_modules() stays as it was
        self._index = index
        self._on_call = on_call

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)

    def forward(self, *args, **kwargs):
        return self._on_call(self._index, args, kwargs)


@contextlib.contextmanager
def _standing_in(layers: nn.ModuleList, on_call: Callable) -> Iterator[None]:
    originals = list(layers)
    try:
        for index, layer in enumerate(originals):
            layers[index] = _StandIn(index, layer, on_call)
        yield
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer


class _ZeroEmbedding(nn.Module):
    """Stands in for the input embeddings when only what follows the layers is run."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.width, self.dtype, self.device = width, dtype, device

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.width, dtype=self.dtype, device=self.device)


@contextlib.contextmanager
def _replaced(model: nn.Module, name: str, stand_in: nn.Module) -> Iterator[None]:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, leaf)
    setattr(parent, leaf, stand_in)
    try:
        yield
    finally:
        setattr(parent, leaf, original)


class _Catcher:
    """Records, per layer, what the model passes it; the last one ends the forward."""

    def __init__(self, count: int, tuple_out: bool) -> None:
        self.count = count
        self.tuple_out = tuple_out
        self.reset()

    def reset(self) -> None:
        self.calls: list[_Call] = []
        self.first_input: torch.Tensor | None = None
        self.returned: torch.Tensor | None = None
        self.passed_through = True  # each layer got the very tensor the previous one returned

    def __call__(self, index: int, args: tuple, kwargs: dict):
        if index != len(self.calls):
            raise CalibInputError(f"the model called layer {index} after {len(self.calls)} layer call(s) in "
                                  "one forward: sequential mode needs each layer called once, in order")
        hidden, call = _split_call(index, args, kwargs)
        if index == 0:
            self.first_input = hidden
        elif hidden is not self.returned:
            self.passed_through = False
        self.calls.append(call)
        if index == self.count - 1:
            raise _Stop
        self.returned = hidden
        return (hidden,) if self.tuple_out else hidden


# --------------------------------------------------------------------------- the walk


@dataclass
class _Stream:
    """One stream of hidden states through the layers, and the observers that watch it."""

    name: str
    kv: bool  # observe keys/values (the forward passes an observing cache)
    groups: list[InputGroup]
    kv_observers: dict[int, tuple[Observer, Observer]] = field(default_factory=dict)
    pairs: list[tuple[SmoothPair, InputGroup]] = field(default_factory=list)  # SmoothQuant stream only
    last_layer: int = -1  # runs through layers 0..last_layer
    feeds_tail: bool = False  # its final hidden states feed the tail forward
    store: _HiddenStates | None = None
    calls: list[list[_Call]] = field(default_factory=list)  # [batch][layer]
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)  # MoE routing counts (see calib.hooks)
    hessians: list[InputGroup] = field(default_factory=list)  # GPTQ: one per fused group of targets
    gptq_pairs: list[tuple[SmoothPair, InputGroup]] = field(default_factory=list)  # SmoothQuant, with GPTQ


@dataclass
class _Walk:
    """What every step of one sequential run reads."""

    model: nn.Module
    plan: Plan
    layout: DecoderLayers
    units: Units
    load_weights: LoadWeights
    device: torch.device
    batches: list[dict[str, torch.Tensor]]
    slots: dict = field(default_factory=dict)
    canonical: dict = field(default_factory=dict)
    in_order_room: int | str = 0  # bytes GPTQ's one-pass layers may add, or why none may run so

    def materialise(self, names: list[str]):
        return materialise(self.model, names, self.load_weights, self.device, self.slots, self.canonical)

    def forward_kwargs(self, kv: bool, session) -> dict:
        return _forward_kwargs(self.model, self.plan, kv, session)


def _streams(model: nn.Module, recipe: Recipe, plan: Plan, layout: DecoderLayers,
             result: SequentialCalibration) -> list[_Stream]:
    """The SmoothQuant stream (unsmoothed model, per-channel ranges), then the
    observing stream (smoothed model, the recipe's observers): either may be absent."""
    streams = []
    smooth_pairs: list[tuple[SmoothPair, InputGroup]] = []
    if recipe.smoothquant is not None:
        pairs = smoothing_pairs(model, plan.targets, recipe.smoothquant.mapping_list(),
                                kv_cache=recipe.kv_cache is not None)
        if not pairs:
            raise CalibInputError(f"recipe {recipe.name!r} asks for SmoothQuant, but {type(model).__name__} has no "
                                  "SmoothQuant pairs (norm -> projections, up -> down, v -> o) among its quantized "
                                  "layers (see calib.algorithms.smoothquant.DEFAULT_MAPPINGS; give "
                                  "smoothquant.mappings)")
        for pair in pairs:
            where = {layout.layer_of(n) for n in [pair.producer, *pair.consumers]}
            if len(where) != 1 or None in where:
                raise CalibInputError(f"SmoothQuant pair {pair.producer} -> {pair.consumers} spans more than one "
                                      "layer: sequential mode rescales one layer at a time")
        groups = [InputGroup(names=[pair.consumers[0]], observer=ChannelMaxObserver(search_rows(recipe)))
                  for pair in pairs]
        smooth_pairs = list(zip(pairs, groups))
        if recipe.gptq is None:
            streams.append(_Stream("smoothquant", kv=False, groups=groups, pairs=smooth_pairs,
                                   last_layer=max(layout.layer_of(p.producer) for p in pairs)))
        result.smoothed = len(pairs)
    groups = input_groups(plan, recipe, result) + sample_groups(plan, result)
    if recipe.kv_cache is not None:
        result.kv_observers = {i: (Observer(), Observer()) for i in plan.attention}
    hessians = _hessian_groups(plan, recipe, layout, result)
    if groups or result.kv_observers or hessians:
        # With GPTQ the SmoothQuant ranges come from GPTQ's first pass over this stream
        # (the inputs the quantized model gives each layer): one stream, two passes a layer.
        streams.append(_Stream("calibrate", kv=recipe.kv_cache is not None, groups=groups,
                               kv_observers=result.kv_observers, hessians=hessians,
                               gptq_pairs=smooth_pairs if hessians else []))
    return streams


def _hessian_groups(plan: Plan, recipe: Recipe, layout: DecoderLayers,
                    result: SequentialCalibration) -> list[InputGroup]:
    """GPTQ's Hessian accumulators, one per group of targets that read one input;
    targets outside the decoder layers (an LM head, a pooler) are rounded to
    nearest, which the report lists."""
    from calib.algorithms.gptq import HessianObserver

    if recipe.gptq is None:
        return []
    found = []
    for members in plan.input_groups():
        if layout.layer_of(members[0]) is None:
            result.gptq_fallbacks.update({m: "outside the decoder layers: rounded to nearest" for m in members})
            continue
        found.append(InputGroup(names=members, observer=HessianObserver()))
    return found


def _default_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in list(model.parameters()) + list(model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _spill_folder(parent: Path | str | None) -> Iterator[Path | None]:
    """A fresh folder for spilled hidden states inside ``parent`` (None: no spilling), removed on exit."""
    if parent is None:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=str(parent)))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Dropout off for the run, as ``from_pretrained`` leaves a model (a skeleton from a config trains)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def calibrate_sequential(model: nn.Module, load_weights: LoadWeights, recipe: Recipe, data: CalibrationSet | None,
                         batch_size: int = 8, pad_token_id: int = 0, device: torch.device | str | None = None,
                         budget_bytes: int | None = None, spill_dir: Path | str | None = None,
                         progress: bool = True) -> SequentialCalibration:
    """Calibrate ``model`` one layer at a time; the observers end as :func:`calibrate`'s would.

    ``model``: a skeleton on ``meta`` (or a loaded model: then nothing is loaded
    or freed). ``load_weights(names)``: module-space parameter (and persistent
    buffer) names -> tensors; it may omit buffers, which are then computed. The
    tensors it returns become the model's for the layer's time and SmoothQuant
    rescales them in place: return fresh tensors, never views of a cache.
    ``budget_bytes``: the memory the run may use, runtime included (what
    ``--max-memory`` says); when the hidden states would not fit beside the
    largest layer they are written to a fresh folder inside ``spill_dir``,
    removed at the end. A budget below the least a run needs is an error before
    any weight is read.
    """
    plan = plan_for(model, recipe)
    result = SequentialCalibration(plan=plan)
    if not recipe.needs_calibration:
        return result
    if data is None or not data.samples:
        raise CalibInputError(f"recipe {recipe.name!r} has static scales and needs calibration data")
    start = time.perf_counter()
    layout = find_decoder_layers(model)
    streams = _streams(model, recipe, plan, layout, result)
    memory = sequential_memory(model, data, batch_size, recipe=recipe)
    result.spilled = _check_budget(memory, budget_bytes, spill_dir)
    device = _default_device(model, device)
    walk = _Walk(model=model, plan=plan, layout=layout, units=units(model, layout), load_weights=load_weights,
                 device=device, slots=tensor_slots(model), canonical=canonical_names(model),
                 batches=[{k: v.to(device) for k, v in b.items()} for b in local_batches(data, batch_size, pad_token_id)])
    walk.in_order_room = _in_order_room(recipe, memory, result.spilled, budget_bytes, device)
    count = len(layout.layers)

    with _spill_folder(spill_dir if result.spilled else None) as folder, _evaluating(model):
        log.info("sequential calibration: %d layers, largest unit %s, hidden states %s x %d stream(s) %s", count,
                 human(memory.unit_bytes), human(memory.hidden_bytes), len(streams),
                 f"spilled to {folder}" if folder else "in memory")
        for stream in streams:
            stream.store = _HiddenStates(len(walk.batches), folder, stream.name, device)
        tail_groups, tuple_out = _catch(walk, streams)
        if tail_groups:
            streams[-1].last_layer, streams[-1].feeds_tail = count - 1, True
        elif streams[-1].name == "calibrate":
            observed = [walk.layout.layer_of(g.names[0]) for g in streams[-1].groups + streams[-1].hessians]
            observed += [walk.layout.layer_of(plan.attention[i]) for i in streams[-1].kv_observers]
            streams[-1].last_layer = max((i for i in observed if i is not None), default=-1)

        layers = max(s.last_layer for s in streams) + 1
        with tqdm(total=layers, desc="calibrate (sequential)", unit="layer", disable=not progress) as bar:
            for index in range(layers):
                layer_start = time.perf_counter()
                distributed.inject_fault(index)
                weights = walk.materialise(walk.units.layers[index])
                try:
                    for stream in streams:
                        if index > stream.last_layer:
                            continue
                        observing = stream.name == "calibrate"  # as calibrate(): the observing pass only
                        with all_experts_observed(model, recipe) if observing else contextlib.nullcontext(False) \
                                as all_experts:
                            layer_pairs = [p for p in stream.pairs if layout.layer_of(p[0].producer) == index]
                            probe = stream.store.peek(0) if layer_pairs else None
                            stages = _in_order_stages(walk, index, stream, recipe, result) if observing else None
                            if stages is not None:
                                tuple_out = _gptq_in_order(walk, index, stream, recipe, result, *stages) or tuple_out
                            else:
                                with _gptq_layer(walk, index, stream, recipe, result) if observing \
                                        else contextlib.nullcontext():
                                    tuple_out = _run_layer(walk, index, stream) or tuple_out
                        result.all_experts = result.all_experts or all_experts
                        if layer_pairs:  # every rank's channel ranges before the rescaling
                            distributed.reduce_states(distributed.current(), [g.observer for _, g in layer_pairs])
                        done = _smooth_layer(model, layer_pairs, recipe, result.transforms, result.smoothing)
                        if done:  # the rewrite must keep the layer's function: batch 0 again, smoothed
                            _check_smoothed(walk, index, stream, probe, stream.store.peek(0), done)
                        if index == stream.last_layer and not stream.feeds_tail:
                            stream.store.clear()  # no later layer reads this stream
                finally:
                    weights.release()
                    _return_freed_memory()
                bar.update()
                log.debug("layer %d/%d: %.2f s (%s of weights)", index + 1, count,
                          time.perf_counter() - layer_start, human(weights.nbytes))
        if tail_groups:
            _tail(walk, streams[-1], tail_groups, tuple_out)

    if result.gptq_in_order or result.gptq_two_pass:
        log.info("GPTQ: %d layer(s) solved in order in one pass, %d in two passes%s", len(result.gptq_in_order),
                 len(result.gptq_two_pass), "" if not result.gptq_two_pass else
                 f" (first: {next(iter(result.gptq_two_pass))}: {next(iter(result.gptq_two_pass.values()))})")
    if result.smoothed:
        log.info("SmoothQuant (%s): rescaled %d norm/projection pairs", describe(result.smoothing),
                 len(result.smoothing))
    if streams[-1].name == "calibrate":
        result.expert_tokens = streams[-1].expert_tokens
        result.batches = len(walk.batches)
        result.tokens = int(sum(int(b["attention_mask"].sum()) for b in walk.batches))
        _reduce_over_ranks(result, streams[-1].groups)
    result.layers = count
    result.seconds = time.perf_counter() - start
    return result


def _check_budget(memory: SequentialMemory, budget: int | None, spill_dir: Path | str | None) -> bool:
    """Whether to spill; an error when even spilling cannot fit the budget or has nowhere to go."""
    if budget is None:
        return False
    if budget < memory.minimum:
        raise CalibInputError(
            f"memory budget {human(budget)} is below the least sequential calibration needs, {human(memory.minimum)}: "
            f"the largest layer {human(memory.unit_bytes)} + one batch's forward {human(memory.workspace_bytes)} + "
            f"3 batches of hidden states {human(3 * memory.batch_hidden_bytes)} + masks and position tables "
            f"{human(memory.extras_bytes)} + runtime {human(memory.runtime_bytes)}"
            + (f" + GPTQ's rounded weights {human(memory.solved_bytes)} and one layer's Hessians "
               f"{human(memory.gptq_layer_bytes)}" if memory.solved_bytes else "")
            + ". Raise --max-memory, or lower --batch-size or --seq-len.")
    if memory.peak(spilled=False) <= budget:
        return False
    held = memory.streams * memory.hidden_bytes
    if spill_dir is None:
        raise CalibInputError(
            f"the hidden states between layers ({human(held)}) do not fit the memory budget {human(budget)} beside "
            f"the largest layer ({human(memory.unit_bytes)}), and no folder to spill them to was given (spill_dir)")
    try:
        free = shutil.disk_usage(spill_dir).free
    except OSError as exc:
        raise CalibInputError(f"cannot spill hidden states to {spill_dir}: {exc}") from None
    if free < held + memory.batch_hidden_bytes:
        raise CalibInputError(f"spilling the hidden states between layers needs {human(held)} on disk, and "
                              f"{spill_dir} has {human(free)} free")
    return True


def _catch(walk: _Walk, streams: list[_Stream]) -> tuple[list[InputGroup], bool]:
    """Run the model up to its last layer's call over every batch, the layers
    standing in (embeddings materialised, then freed): each stream's first hidden
    states and every layer's arguments.

    Targeted modules outside the layers are observed here when they run before
    the layers; the others are returned (the tail observes them). Also returns
    whether the model expects layers to return tuples.
    """
    model, layout = walk.model, walk.layout
    watching = streams[-1] if streams[-1].name == "calibrate" else None
    outside = [g for g in (watching.groups if watching else []) if layout.layer_of(g.names[0]) is None]
    ran: set[str] = set()
    weights = walk.materialise(walk.units.prefix)
    hooks = []
    try:
        tuple_out = _layer_output_kind(walk, streams[0].kv)
        modules = dict(model.named_modules())
        for group in outside:
            for name in group.names:
                hooks.append(modules[name].register_forward_pre_hook(lambda m, a, name=name: ran.add(name)))
        for kv in dict.fromkeys(s.kv for s in streams):  # streams with the same arguments share one catch
            sharing = [s for s in streams if s.kv == kv]
            catcher = _Catcher(len(layout.layers), tuple_out)
            calls: list[list[_Call]] = []
            with torch.inference_mode(), observe(model, outside if watching in sharing else []) as session, \
                    _standing_in(layout.layers, catcher):
                for index, batch in enumerate(walk.batches):
                    session.set_mask(batch["attention_mask"])
                    _catch_one(walk, batch, kv, session, catcher)
                    if not catcher.passed_through:
                        raise CalibInputError(
                            f"{type(model).__name__} changes the hidden states between its layers (or passes a "
                            "layer something other than the previous layer's output): sequential mode cannot run "
                            "it layer by layer. Calibrate it in memory.")
                    calls.append(catcher.calls)
                    for stream in sharing:
                        stream.store.put(index, catcher.first_input)
            for stream in sharing:
                stream.calls = calls
    finally:
        for hook in hooks:
            hook.remove()
        weights.release()
        _return_freed_memory()
    return [g for g in outside if not any(n in ran for n in g.names)], tuple_out


def _catch_one(walk: _Walk, batch: dict, kv: bool, session, catcher: _Catcher) -> None:
    catcher.reset()
    try:
        walk.model(**batch, **walk.forward_kwargs(kv, session))
    except _Stop:
        return
    raise CalibInputError(f"the forward of {type(walk.model).__name__} ended without calling its last layer "
                          f"({walk.layout.layer_name(len(walk.layout.layers) - 1)})")


def _layer_output_kind(walk: _Walk, kv: bool) -> bool:
    """Whether the model takes a tuple from each layer (``outputs[0]``) or the
    hidden states themselves: whichever makes the next layer receive the very
    tensor the stand-in returned (one prefix forward, no observers)."""
    layers = walk.layout.layers
    if len(layers) < 2:
        return False
    with torch.inference_mode(), observe(walk.model, []) as session:
        for tuple_out in (False, True):
            catcher = _Catcher(len(layers), tuple_out)
            with _standing_in(layers, catcher):
                session.set_mask(walk.batches[0]["attention_mask"])
                try:
                    _catch_one(walk, walk.batches[0], kv, session, catcher)
                except Exception:  # the wrong kind breaks the model's own code: try the other
                    continue
            if catcher.passed_through:
                return tuple_out
    return False  # the catch proper explains the problem


def _layer_output(walk: _Walk, index: int, out, hidden: torch.Tensor) -> torch.Tensor:
    """The next hidden states from what layer ``index`` returned (checked)."""
    result = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(result) or result.shape != hidden.shape:
        raise CalibInputError(f"{walk.layout.layer_name(index)} returned {type(result).__name__} "
                              f"{list(getattr(result, 'shape', []))} for hidden states "
                              f"{list(hidden.shape)}: sequential mode expects the next hidden states first")
    return result


def _run_layer(walk: _Walk, index: int, stream: _Stream) -> bool:
    """Every batch of ``stream`` through layer ``index`` with its observers; the
    outputs replace the inputs in the store. Returns whether the layer returns a tuple."""
    layout, config = walk.layout, getattr(walk.model, "config", None)
    layer = layout.layers[index]
    groups = [g for g in stream.groups if layout.layer_of(g.names[0]) == index]
    kv = {i: obs for i, obs in stream.kv_observers.items() if layout.layer_of(walk.plan.attention[i]) == index}
    tuple_out = False
    with torch.inference_mode(), observe(walk.model, groups, kv, stream.expert_tokens) as session:
        for batch, hidden in stream.store.take_all():
            session.set_mask(walk.batches[batch]["attention_mask"])
            args, kwargs = stream.calls[batch][index].bind(hidden, lambda: observing_cache(session, config))
            out = layer(*args, **kwargs)
            tuple_out = isinstance(out, tuple)
            result = _layer_output(walk, index, out, hidden)
            del out, hidden, args, kwargs
            stream.store.put(batch, result)
    return tuple_out


class _StopWhenAllRead:
    """Forward pre-hooks that end a layer's forward (raise :class:`_Stop`) as soon as
    every module of ``groups`` has read its input in this batch: GPTQ's Hessian
    pass needs the inputs only, so the rest of the layer (``down_proj``'s product,
    the residual) is not computed. Registered after :func:`observe`'s hooks, so the
    last module is observed before the stop.

    The first batch runs to its end and counts each module's calls; the stop is
    armed only if every module was called exactly once. A module read twice in a
    forward (its second read would be lost) or not at all (an expert no token was
    routed to) leaves every batch running to its end."""

    def __init__(self, model: nn.Module, groups: list[InputGroup]) -> None:
        self.names = {n for g in groups for n in g.names}
        self.calls: dict[str, int] = {}
        self.armed: bool | None = None  # None: not decided until the first batch has run
        self.handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.armed and len(self.calls) == len(self.names):
                raise _Stop
        return hook

    def next_batch(self) -> None:
        """Start a batch; after the first, decide from its calls whether to stop early."""
        if self.armed is None and self.calls:
            self.armed = all(self.calls.get(n) == 1 for n in self.names)
        self.calls = {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _hessian_pass(walk: _Walk, index: int, stream: _Stream, groups: list[InputGroup]) -> torch.Tensor:
    """GPTQ's first pass: every batch of ``stream`` through layer ``index`` with only
    ``groups`` observing (Hessians, SmoothQuant's ranges). The inputs stay in the
    store for the observing pass; after the first batch, each forward stops once
    every group has read its input (:class:`_StopWhenAllRead`). Returns batch 0's
    output (float32, it runs to the end): the layer's function before SmoothQuant,
    for the check after it."""
    layout, config = walk.layout, getattr(walk.model, "config", None)
    layer = layout.layers[index]
    first = None
    with torch.inference_mode(), observe(walk.model, groups) as session:
        stop = _StopWhenAllRead(walk.model, groups)
        try:
            for batch, hidden in stream.store.take_all(keep=True):
                session.set_mask(walk.batches[batch]["attention_mask"])
                stop.next_batch()
                args, kwargs = stream.calls[batch][index].bind(hidden, lambda: observing_cache(session, config))
                try:
                    out = layer(*args, **kwargs)
                except _Stop:
                    continue
                result = _layer_output(walk, index, out, hidden)
                if first is None:
                    first = result.detach().float()
                del out, result
        finally:
            stop.remove()
    return first


@contextlib.contextmanager
def _gptq_layer(walk: _Walk, index: int, stream: _Stream, recipe: Recipe, result: SequentialCalibration):
    """GPTQ for layer ``index``: a pass over the stream's inputs accumulating each
    target group's Hessian, the solve, and then, for the block (the observing
    pass that makes the next layer's inputs), the layer's weights replaced by the
    rounded ones, so every later layer sees the quantized layer's outputs. The
    float weights come back afterwards: what GPTQ chose goes to the writer as data
    (``result.solved``), like SmoothQuant's transforms."""
    hessians = [g for g in stream.hessians if walk.layout.layer_of(g.names[0]) == index]
    pairs = [p for p in stream.gptq_pairs if walk.layout.layer_of(p[0].producer) == index]
    if not hessians:
        yield
        return
    before = _hessian_pass(walk, index, stream, hessians + [group for _, group in pairs])
    distributed.reduce_states(distributed.current(), [g.observer for g in hessians] + [g.observer for _, g in pairs])
    probe = stream.store.peek(0) if pairs else None
    done = _smooth_layer(walk.model, pairs, recipe, result.transforms, result.smoothing)
    if done:
        _check_smoothed(walk, index, stream, probe, before, done)
    _smooth_hessians(done, hessians)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        _solve_groups(walk, hessians, recipe, result, saved)
        yield
    finally:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)


def _smooth_hessians(done: list[tuple[SmoothPair, torch.Tensor]], hessians: list[InputGroup]) -> None:
    """SmoothQuant divides a consumer's input channels by s: its Hessian becomes H / (s s^T)."""
    for pair, scales in done:
        for group in hessians:
            if pair.consumers[0] in group.names and group.observer.observed:
                s = scales.to(group.observer.h.device)
                group.observer.h = group.observer.h / s.unsqueeze(0) / s.unsqueeze(1)


def _solve_groups(walk: _Walk, hessians: list[InputGroup], recipe: Recipe, result: SequentialCalibration,
                  saved: list[tuple[torch.Tensor, torch.Tensor]], turn: int | None = None) -> None:
    """GPTQ for ``hessians`` (their Hessians complete, on every rank): each group
    solved (several processes: each its share, then every rank gets every
    result; ``turn``: one group solved by rank ``turn % world``, so that stages
    solved one at a time take turns), the results in ``result.solved``, and the
    modules' weights replaced by the rounded ones; the float weights go to
    ``saved`` (``(param, copy)``)."""
    from calib.algorithms.gptq import solve
    from calib.quantize import fused_weight_amax, weight_scale

    model, args, gptq = walk.model, recipe.weights, recipe.gptq
    ranks = distributed.current()
    todo = [g for g in hessians if g.observer.observed]
    for group in hessians:
        if not group.observer.observed:
            result.gptq_fallbacks.update({n: "no calibration tokens reached it: rounded to nearest"
                                          for n in group.names})
    world = ranks.world if ranks else 1
    if turn is not None:
        owners = [turn % world for _ in todo]
    else:
        owners = distributed.owner_of([_solve_cost(g.observer.h.shape[0], sum(model.get_submodule(n).weight.shape[0]
                                                                               for n in g.names)) for g in todo], world)
    mine = [g for g, owner in zip(todo, owners) if owner == (ranks.rank if ranks else 0)]
    solved_by_group: dict[int, dict] = {}
    for group in todo:
        params = [model.get_submodule(n).weight for n in group.names]
        shared = fused_weight_amax(args, group.names, params)
        scales = [weight_scale(p.detach(), args, n, shared)[1] for n, p in zip(group.names, params)]
        if any(group is g for g in mine):
            solved_by_group[id(group)] = solve(group.names, [p.detach() for p in params], scales, group.observer.h,
                                               args, block_size=gptq.block_size,
                                               dampening_frac=gptq.dampening_frac, actorder=gptq.actorder)
        else:
            solved_by_group[id(group)] = {"scales": scales, "params": params}
        group.observer.h = None  # [in, in] float64 per group: freed as soon as it is used
    if ranks is not None:
        ranks.check(None)  # a solve that failed on one rank stops every rank here
        for group, owner in zip(todo, owners):
            solved_by_group[id(group)] = _share_solved(ranks, owner, group.names, solved_by_group[id(group)], args)
    for group in todo:
        solved = solved_by_group[id(group)]
        for name in group.names:
            param = model.get_submodule(name).weight
            rounded = solved[name]
            full = qmath.expand_scale(rounded.scale.to(torch.float32), param.shape, args.strategy, args.group_size)
            saved.append((param, param.detach().clone()))
            with torch.no_grad():
                param.copy_((rounded.q.to(torch.float32) * full).to(device=param.device, dtype=param.dtype))
        result.solved.update(solved)


# --------------------------------------------------------------------------- GPTQ in order, one pass a layer


def _in_order_room(recipe: Recipe, memory: SequentialMemory, spilled: bool, budget: int | None,
                   device: torch.device) -> int | str:
    """The bytes GPTQ's one-pass layers may hold beyond the two-pass run (every
    batch's activations inside a layer at once), or why no layer may run so."""
    from calib.estimate import available_memory_bytes

    if recipe.gptq is None:
        return "no GPTQ"
    if not recipe.gptq.true_sequential:
        return "gptq.true_sequential is false"
    if spilled:
        return "the hidden states are spilled to disk (a one-pass layer holds every batch's activations)"
    if budget is not None:
        return max(0, budget - memory.peak(spilled=False))
    return available_memory_bytes(device) // 2


def _probe_calls(walk: _Walk, index: int, stream: _Stream, names: list[str], hidden: torch.Tensor,
                 whole_batch: bool = False) -> tuple[list[tuple[str, int]], torch.Tensor]:
    """Layer ``index`` on the first sample of batch 0 (on all of it with
    ``whole_batch``; its input ``hidden``), no observer: the calls of ``names``
    in order (module, which input tensor) and the output (float32)."""
    config, model = getattr(walk.model, "config", None), walk.model
    seen: list[tuple[str, torch.Tensor | None]] = []

    def recorder(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen.append((name, args[0] if args else None))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(recorder(n)) for n in names]
    try:
        with torch.inference_mode(), observe(model, []) as session:
            session.set_mask(walk.batches[0]["attention_mask"])
            args, kwargs = stream.calls[0][index].bind(hidden, lambda: observing_cache(session, config))
            if not whole_batch:
                args, kwargs = one_sample(args, kwargs, hidden.shape[0])
            out = walk.layout.layers[index](*args, **kwargs)
            out = (out[0] if isinstance(out, (tuple, list)) else out).detach().float()
        calls = [(name, id(x)) for name, x in seen]  # the tensors are alive here: ids are unique
    finally:
        for handle in handles:
            handle.remove()
    return calls, out


def _in_order_stages(walk: _Walk, index: int, stream: _Stream, recipe: Recipe,
                     result: SequentialCalibration) -> tuple[list[Stage], torch.Tensor] | None:
    """Layer ``index``'s GPTQ stages and its float output on one probe sample, when
    the layer runs in order in one pass (:mod:`calib.in_order`); None when it has
    no GPTQ target or runs in two passes (the reason goes to the report). Every
    rank decides alike."""
    hessians = [g for g in stream.hessians if walk.layout.layer_of(g.names[0]) == index]
    if not hessians:
        return None
    pairs = [p for p in stream.gptq_pairs if walk.layout.layer_of(p[0].producer) == index]
    name = walk.layout.layer_name(index)
    stages: list[Stage] | str = walk.in_order_room if isinstance(walk.in_order_room, str) else ""
    before = None
    if not stages and not walk.batches:
        stages = "no calibration batch on this rank"
    if not stages:
        calls, before = _probe_calls(walk, index, stream, sorted({n for g in hessians for n in g.names}),
                                     stream.store.peek(0))
        stages = plan_stages(calls, [g.names for g in hessians], pairs,
                             producer_rounded_ok=recipe.weights.strategy in ("channel", "group"))
    if not isinstance(stages, str):
        widths = max(walk.model.get_submodule(s.first).weight.shape[1] for s in stages)
        hidden = stream.store.peek(0)
        tokens = sum(int(b["input_ids"].numel()) for b in walk.batches)
        extra = tokens * (2 * widths + 4 * hidden.shape[-1]) * hidden.element_size()
        if extra > walk.in_order_room:
            stages = (f"every batch's activations inside the layer ({human(extra)}) exceed the memory left "
                      f"({human(walk.in_order_room)})")
    ranks = distributed.current()
    if ranks is not None:  # one rank that cannot makes every rank take two passes
        mine = None if isinstance(stages, str) else [s.names for s in stages]
        views = ranks.all_gather_json(mine)
        if any(v != views[0] for v in views) or views[0] is None:
            stages = stages if isinstance(stages, str) else "another rank runs this layer in two passes"
    if isinstance(stages, str):
        result.gptq_two_pass[name] = stages
        return None
    result.gptq_in_order.append(name)
    return stages, before


def _gptq_in_order(walk: _Walk, index: int, stream: _Stream, recipe: Recipe, result: SequentialCalibration,
                   stages: list[Stage], before: torch.Tensor) -> bool:
    """Layer ``index`` with GPTQ in one pass (:mod:`calib.in_order`): every batch
    in its own greenlet, parked at each stage's first module until all are there;
    then the stage's Hessian (and SmoothQuant ranges) are complete: the stage is
    smoothed, solved and its weights replaced by the rounded ones, and the
    batches go on. The outputs replace the inputs in the store, the recipe's
    observers see the rounded layer as in the two-pass run, and the float
    weights come back at the end. Returns whether the layer returns a tuple."""
    layout, model, config = walk.layout, walk.model, getattr(walk.model, "config", None)
    layer = layout.layers[index]
    groups = [g for g in stream.groups if layout.layer_of(g.names[0]) == index]
    kv = {i: obs for i, obs in stream.kv_observers.items() if layout.layer_of(walk.plan.attention[i]) == index}
    hessian_of = {tuple(g.names): g for g in stream.hessians if layout.layer_of(g.names[0]) == index}
    scales: dict[int, torch.Tensor] = {}  # stage -> SmoothQuant's s on its input, once chosen
    held: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}  # batch -> (its input, divided by s)
    live: dict = {}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    done: list[tuple[SmoothPair, torch.Tensor]] = []

    def stage_hook(number: int, stage: Stage, name: str):
        watching = [hessian_of[tuple(stage.names)].observer] + [g.observer for _, g in stage.pairs]

        def hook(module: nn.Module, args: tuple):
            baton, session = live.get("baton"), live.get("session")
            i = baton.current() if baton is not None else None
            if i is None or not args:
                return None
            x = args[0]
            if name == stage.first:
                mask = _positions_mask(x, session.mask, session.rows)
                try:
                    for observer in watching:
                        observer.update(x.detach(), mask)
                except NonFiniteInput as exc:
                    raise session.nonfinite_error(name, exc) from None
                baton.pause(number)
                s = scales.get(number)
                held[i] = None if s is None else (x, x / s.to(device=x.device, dtype=x.dtype))
            pair = held.get(i)
            if pair is None:
                return None
            if pair[0] is not x:
                raise RuntimeError(f"{name} read another tensor than {stage.first} (the probe said they read one): "
                                   "a bug in calib's in-order GPTQ")
            return (pair[1], *args[1:])
        return hook

    inputs = list(stream.store.take_all())
    probe = inputs[0][1]  # batch 0's input: the smoothing check's probe sample
    handles = [model.get_submodule(n).register_forward_pre_hook(stage_hook(k, st, n))
               for k, st in enumerate(stages) for n in st.names]
    tuple_out = False
    try:
        with torch.inference_mode(), observe(model, groups, kv, stream.expert_tokens) as session:
            live["session"] = session

            def job(batch: int, hidden: torch.Tensor):
                def run():
                    with torch.inference_mode():
                        args, kwargs = stream.calls[batch][index].bind(hidden, lambda: observing_cache(session, config))
                        return layer(*args, **kwargs)
                return run

            baton = live["baton"] = Baton([job(batch, hidden) for batch, hidden in inputs])
            try:
                for number in [*range(len(stages)), DONE]:
                    for i, (batch, _) in enumerate(inputs):
                        session.resume(batch, walk.batches[batch]["attention_mask"])
                        where = baton.step(i)
                        if where == FAILED:
                            raise baton.errors[i]
                        if where != number:
                            raise RuntimeError(f"{layout.layer_name(index)}: batch {batch} stopped at {where!r}, "
                                               f"batch {inputs[0][0]} at {number!r}: the layer's call order differs "
                                               "between batches (a bug in calib's in-order GPTQ)")
                    if number != DONE:  # outside inference mode, as in two passes (elementwise ops on
                        # parameters measured ~1.3x slower inside it)
                        with torch.inference_mode(False), torch.no_grad():
                            _solve_stage(walk, stages[number], hessian_of[tuple(stages[number].names)], recipe,
                                         result, saved, done, scales, number)
            finally:
                baton.close()
            for i, (batch, hidden) in enumerate(inputs):
                out = baton.results[i]
                tuple_out = isinstance(out, tuple)
                stream.store.put(batch, _layer_output(walk, index, out, hidden))
                baton.results[i] = None
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)
    if done:  # the rewrite must keep the layer's function: the probe sample again, float weights, smoothed
        _, after = _probe_calls(walk, index, stream, [], probe)
        from calib.algorithms.smoothquant import check_preserved, relative_change

        dtype = model.get_submodule(done[0][0].consumers[0]).weight.dtype
        check_preserved(layout.layer_name(index), [pair for pair, _ in done], relative_change(before, after), dtype)
    return tuple_out


def _solve_stage(walk: _Walk, stage: Stage, hessian: InputGroup, recipe: Recipe, result: SequentialCalibration,
                 saved: list, done: list, scales: dict, number: int) -> None:
    """At a stage's barrier (every batch's input seen): its ranges and Hessian
    reduced over ranks, its SmoothQuant pairs chosen and applied, then GPTQ."""
    distributed.reduce_states(distributed.current(), [hessian.observer] + [g.observer for _, g in stage.pairs])
    now = _smooth_layer(walk.model, stage.pairs, recipe, result.transforms, result.smoothing)
    for pair, s in now:
        # A producer rounded at an earlier stage (up_proj for down_proj): its rows were divided
        # (the rounded copy, unused from here on); the float copy and the stored scale take the
        # same division: q * scale / s is exactly the rescaled rounded weight.
        weight, rows = walk.model.get_submodule(pair.producer).weight, pair.producer_scales(s)
        for param, original in saved:
            if param is weight:
                original.div_(rows.to(device=original.device, dtype=original.dtype).unsqueeze(1))
        if pair.producer in result.solved:
            rounded = result.solved[pair.producer]
            shape = [-1] + [1] * (rounded.scale.dim() - 1)
            result.solved[pair.producer] = dataclasses.replace(
                rounded, scale=(rounded.scale / rows.to(rounded.scale.dtype).reshape(shape)).to(rounded.scale.dtype))
        scales[number] = s
    done.extend(now)
    _smooth_hessians(now, [hessian])
    _solve_groups(walk, [hessian], recipe, result, saved, turn=number)


def _solve_cost(inputs: int, outputs: int) -> int:
    """A GPTQ solve's cost in multiply-adds, roughly: the inverse factor (``in^3``,
    float64), the blocks' updates and the output errors (``~3.5 in^2 out``), and
    the column loop's per-column overhead (worth ~20k multiply-adds a column)."""
    return inputs ** 3 + (7 * inputs * inputs * outputs) // 2 + 20_000 * inputs


def _share_solved(ranks, owner: int, names: list[str], mine, args) -> dict:
    """GPTQ results for ``names`` as rank ``owner`` solved them, on every rank: the
    stored values and the figures are broadcast; the scales every rank computed
    alike (``mine`` is ``solve``'s result on the owner, else the scales and weights)."""
    from calib.algorithms.gptq import Solved

    out = {}
    for index, name in enumerate(names):
        if ranks.rank == owner:
            s = mine[name]
            q, scale = s.q, s.scale
            figures = torch.tensor([s.dampening, s.output_error, s.output_error_rtn, float(s.escalated)],
                                   dtype=torch.float64)
        else:
            weight = mine["params"][index]
            q = torch.empty(tuple(weight.shape), dtype=qmath.FP8_DTYPE if args.is_fp8 else torch.int8)
            scale, figures = mine["scales"][index].cpu(), torch.zeros(4, dtype=torch.float64)
        q = ranks.broadcast(q, owner)
        figures = ranks.broadcast(figures, owner).tolist()
        out[name] = Solved(q=q, scale=scale, dampening=figures[0], output_error=figures[1],
                           output_error_rtn=figures[2], escalated=bool(figures[3]))
    return out


def _check_smoothed(walk: _Walk, index: int, stream: _Stream, hidden: torch.Tensor, before: torch.Tensor,
                    done: list[tuple[SmoothPair, torch.Tensor]]) -> None:
    """Stop, naming the mappings, when smoothing layer ``index`` moved its output on
    batch 0 beyond float rounding (:func:`calib.algorithms.smoothquant.check_preserved`)."""
    from calib.algorithms.smoothquant import check_preserved, relative_change

    _, after = _probe_calls(walk, index, stream, [], hidden, whole_batch=True)
    dtype = walk.model.get_submodule(done[0][0].consumers[0]).weight.dtype
    check_preserved(walk.layout.layer_name(index), [pair for pair, _ in done],
                    relative_change(before.float(), after), dtype)


def _smooth_layer(model: nn.Module, layer_pairs: list[tuple[SmoothPair, InputGroup]], recipe: Recipe,
                  transforms: dict[str, list[ChannelScale]], choices: dict) -> list[tuple[SmoothPair, torch.Tensor]]:
    """Rescale one layer's pairs as ``calibration._smooth`` does (same order, same
    functions), and record the rescaling per tensor (and each pair's choice in
    ``choices``); returns the pairs' scales."""
    done = []
    for pair, group in layer_pairs:
        if not group.observer.observed:
            continue
        choices[pair.producer] = smooth_pair(model, pair, group.observer, recipe)
        scales = choices[pair.producer].scales
        apply_smoothing(model, pair, scales)
        s = scales.detach().to("cpu")
        rows = pair.producer_scales(s)
        producer = model.get_submodule(pair.producer)
        transforms.setdefault(f"{pair.producer}.weight", []).append(
            ChannelScale(rows, dim=0, divide=True, offset=0.0 if isinstance(producer, nn.Linear) else pair.offset))
        if getattr(producer, "bias", None) is not None:
            transforms.setdefault(f"{pair.producer}.bias", []).append(ChannelScale(rows, dim=0, divide=True))
        for name in pair.consumers:
            transforms.setdefault(f"{name}.weight", []).append(ChannelScale(s, dim=1, divide=False))
        done.append((pair, s))
    return done


def _tail(walk: _Walk, stream: _Stream, groups: list[InputGroup], tuple_out: bool) -> None:
    """Observe the targeted modules after the layers (LM head, pooler): a forward
    with the input embeddings stubbed out and the layers standing in, the last
    one returning the stored final hidden states. Stops at the head once its
    input is observed: no logits are computed."""
    model, u = walk.model, walk.units
    count = len(walk.layout.layers)
    finals: dict[str, torch.Tensor] = {}

    def replay(index: int, args: tuple, kwargs: dict):
        hidden, _ = _split_call(index, args, kwargs)
        if index == count - 1:
            hidden = finals["hidden"]
        return (hidden,) if tuple_out else hidden

    weights = walk.materialise(u.tail)
    try:
        with contextlib.ExitStack() as stack:
            if u.input_embeddings is not None and u.input_embeddings != u.output_embeddings:
                embed = model.get_submodule(u.input_embeddings).weight
                stack.enter_context(_replaced(model, u.input_embeddings,
                                              _ZeroEmbedding(embed.shape[-1], embed.dtype, walk.device)))
            stack.enter_context(_standing_in(walk.layout.layers, replay))
            stack.enter_context(torch.inference_mode())
            session = stack.enter_context(observe(model, groups))
            if u.output_embeddings in {n for g in groups for n in g.names}:
                # registered after the observers' hooks, so it runs after them
                stack.callback(model.get_submodule(u.output_embeddings).register_forward_pre_hook(_stop).remove)
            for index, hidden in stream.store.take_all():
                finals["hidden"] = hidden
                batch = walk.batches[index]
                session.set_mask(batch["attention_mask"])
                try:
                    model(**batch, **walk.forward_kwargs(False, session))
                except _Stop:
                    pass
                finals.clear()
    finally:
        weights.release()
        _return_freed_memory()
