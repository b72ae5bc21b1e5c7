"""Walking a transformers model one decoder layer at a time, without tracing.

A transformers model is a prefix (embeddings, positions, rotary tables), a
``ModuleList`` of repeated blocks (the decoder or encoder layers), and a tail
(final norm, head). Sequential calibration runs the blocks one at a time, so it
needs three things from a model, all found here from the module tree alone:

- where the blocks are (:func:`find_decoder_layers`);
- which tensors make up each *unit* it materialises at once (the prefix, one
  layer, the tail) and how many bytes that is (:func:`units`);
- how to give a unit of a ``meta`` skeleton real tensors and take them back
  (:func:`materialise` -> :meth:`Materialised.release`).

Tensors are addressed by module-space names (``model.layers.3.mlp.up_proj.weight``),
the names ``load_weights`` receives; mapping them to a checkpoint's names is
the reader's job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from calib.errors import CalibInputError

log = logging.getLogger(__name__)

# model_type -> path of the block ModuleList, for models where the generic rule
# (the one outermost ModuleList of blocks) is ambiguous or wrong. The families
# calib is tested on (Llama, Mistral, Qwen2, Gemma, Phi-3, OPT, GPT-NeoX, BERT)
# need no entry.
LAYER_PATHS: dict[str, str] = {}

# Modules outside the blocks that run after them although a model registers
# them before (OPT's decoder registers final_layer_norm and project_out first).
_TAIL_NAMES = ("final_layer_norm", "final_layernorm", "project_out", "ln_f", "norm_f")

LoadWeights = Callable[[list[str]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class DecoderLayers:
    """The repeated blocks of a model and the modules around them.

    ``before`` / ``after``: modules outside the blocks that hold tensors of their
    own, by name, split by where they run (registration order, with rotary and
    position helpers counted before and known final norms / output projections
    after). Unpacks as ``before, layers, after = find_decoder_layers(model)``.
    """

    path: str  # e.g. "model.layers"
    layers: nn.ModuleList
    before: dict[str, nn.Module]
    after: dict[str, nn.Module]

    def layer_name(self, index: int) -> str:
        return f"{self.path}.{index}"

    def layer_of(self, name: str) -> int | None:
        """The index of the block that module/tensor ``name`` lives in, or None."""
        head = self.path + "."
        if not name.startswith(head):
            return None
        index = name[len(head):].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def __iter__(self) -> Iterator:
        return iter((self.before, self.layers, self.after))


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost ModuleLists whose every entry is a block (a module with submodules and parameters)."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue  # e.g. MoE experts inside a decoder layer
        if all(any(True for _ in entry.children()) and any(True for _ in entry.parameters()) for entry in module):
            found.append((name, module))
    return found


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def find_decoder_layers(model: nn.Module) -> DecoderLayers:
    """Find the ModuleList of repeated blocks (``model.layers``, ``transformer.h``,
    ``gpt_neox.layers``, ``model.decoder.layers``, ``bert.encoder.layer``, ...).

    The rule: the one outermost ModuleList whose entries are all blocks. A model
    with several (encoder-decoder, vision + language) needs an entry in
    :data:`LAYER_PATHS` naming the one to walk.
    """
    kind = _model_type(model)
    if kind in LAYER_PATHS:
        path = LAYER_PATHS[kind]
        layers = dict(model.named_modules()).get(path)
        if not isinstance(layers, nn.ModuleList):
            raise CalibInputError(f"LAYER_PATHS names {path!r} for model_type {kind!r}, but "
                                  f"{type(model).__name__} has no ModuleList there")
    else:
        lists = _block_lists(model)
        if len(lists) != 1:
            what = "no ModuleList of blocks" if not lists else \
                f"{len(lists)} ModuleLists of blocks ({', '.join(n for n, _ in lists)})"
            raise CalibInputError(
                f"sequential mode walks a model's repeated layers one at a time, and found {what} in "
                f"{type(model).__name__} (model_type {kind!r}). Name the one to walk in "
                "calib.layers.LAYER_PATHS, or calibrate the model in memory.")
        path, layers = lists[0]
    before: dict[str, nn.Module] = {}
    after: dict[str, nn.Module] = {}
    seen_layers = False
    for name, module in model.named_modules():
        if name == path:
            seen_layers = True
            continue
        if name.startswith(path + ".") or not _has_own_tensors(module):
            continue
        leaf = name.rpartition(".")[2]
        helper = not any(True for _ in module.parameters(recurse=False))  # rotary tables and the like
        if helper or (not seen_layers and leaf not in _TAIL_NAMES):
            before[name] = module
        else:
            after[name] = module
    return DecoderLayers(path=path, layers=layers, before=before, after=after)


def _has_own_tensors(module: nn.Module) -> bool:
    return any(t is not None for t in module._parameters.values()) or \
        any(t is not None for t in module._buffers.values())


@dataclass(frozen=True)
class Slot:
    """One place a tensor lives in a module (tied tensors have several)."""

    module: nn.Module
    leaf: str
    kind: str  # "param" | "buffer" (persistent, in the state dict) | "computed" (non-persistent buffer)

    def get(self) -> torch.Tensor:
        store = self.module._parameters if self.kind == "param" else self.module._buffers
        return store[self.leaf]

    def set(self, tensor: torch.Tensor) -> None:
        store = self.module._parameters if self.kind == "param" else self.module._buffers
        store[self.leaf] = tensor


def tensor_slots(model: nn.Module) -> dict[str, Slot]:
    """Every parameter and buffer by full module-space name, tied duplicates included."""
    slots: dict[str, Slot] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for leaf, tensor in module._parameters.items():
            if tensor is not None:
                slots[prefix + leaf] = Slot(module, leaf, "param")
        for leaf, tensor in module._buffers.items():
            if tensor is not None:
                computed = leaf in module._non_persistent_buffers_set
                slots[prefix + leaf] = Slot(module, leaf, "computed" if computed else "buffer")
    return slots


def canonical_names(model: nn.Module) -> dict[int, str]:
    """``id(tensor) -> name`` under which a tied tensor is requested: its first name
    (``model.embed_tokens.weight`` for a head tied to the embeddings)."""
    names: dict[int, str] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        names.setdefault(id(tensor), name)
    return names


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def input_embeddings_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        return _module_name(model, get() if callable(get) else None)
    except NotImplementedError:
        return None


def output_embeddings_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return _module_name(model, get() if callable(get) else None)
    except NotImplementedError:
        return None


@dataclass
class Units:
    """The tensor names sequential mode materialises at once, unit by unit.

    ``prefix``: everything outside the blocks except an untied output head (what
    the catching forward needs); ``layers[i]``: block ``i``; ``tail``:
    everything outside the blocks except the input embeddings (what a forward
    over stored final hidden states needs to reach the head).
    """

    prefix: list[str]
    layers: list[list[str]]
    tail: list[str]
    input_embeddings: str | None
    output_embeddings: str | None


def _tied(slots: dict[str, Slot], a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    wa, wb = slots.get(f"{a}.weight"), slots.get(f"{b}.weight")
    return wa is not None and wb is not None and wa.get() is wb.get()


def units(model: nn.Module, layout: DecoderLayers | None = None) -> Units:
    layout = layout or find_decoder_layers(model)
    slots = tensor_slots(model)
    head, embed = output_embeddings_name(model), input_embeddings_name(model)
    tied = _tied(slots, head, embed)
    per_layer: list[list[str]] = [[] for _ in layout.layers]
    outside: list[str] = []
    for name in slots:
        index = layout.layer_of(name)
        if index is not None and index < len(per_layer):
            per_layer[index].append(name)
        else:
            outside.append(name)

    def under(name: str, module: str | None) -> bool:
        return module is not None and (name == module or name.startswith(module + "."))

    prefix = [n for n in outside if tied or not under(n, head)]
    tail = [n for n in outside if tied or not under(n, embed)]
    return Units(prefix=prefix, layers=per_layer, tail=tail, input_embeddings=embed, output_embeddings=head)


def unit_bytes(model: nn.Module, names: list[str], dtype: torch.dtype | None = None,
               slots: dict[str, Slot] | None = None) -> int:
    """Bytes the named tensors take once materialised (tied tensors once), floating
    point ones in ``dtype`` when given (the load dtype of a skeleton)."""
    slots = slots if slots is not None else tensor_slots(model)
    seen: set[int] = set()
    total = 0
    for name in names:
        tensor = slots[name].get()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        kind = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        total += tensor.numel() * kind.itemsize
    return total


def largest_layer_bytes(model: nn.Module, dtype: torch.dtype | None = None, tail: bool = True) -> int:
    """The most bytes sequential mode holds materialised at once: the largest of
    the prefix, any one block and (``tail``: a target sits after the blocks) the tail."""
    u = units(model)
    slots = tensor_slots(model)
    sizes = [unit_bytes(model, u.prefix, dtype, slots)]
    sizes += [unit_bytes(model, names, dtype, slots) for names in u.layers]
    if tail:
        sizes.append(unit_bytes(model, u.tail, dtype, slots))
    return max(sizes)


@dataclass
class Materialised:
    """Tensors given real storage for a while; :meth:`release` puts the originals back."""

    restores: list[tuple[Slot, torch.Tensor]] = field(default_factory=list)
    nbytes: int = 0

    def release(self) -> None:
        for slot, original in reversed(self.restores):
            slot.set(original)
        self.restores.clear()


def _init_computed(model: nn.Module, slots: dict[str, Slot], names: list[str], device: torch.device,
                   handle: Materialised) -> None:
    """Give non-persistent buffers (rotary ``inv_freq``, BERT ``position_ids``) their
    values the way ``from_pretrained`` does: the model's ``_init_weights``.

    They are filled with a sentinel first, so a buffer ``_init_weights`` does not
    know (custom code) is an error rather than garbage. Runs while the module's
    parameters are still on ``meta``: what ``_init_weights`` does to them is void.
    """
    owners: dict[int, tuple[nn.Module, list[tuple[str, Slot]]]] = {}
    for name in names:
        slot = slots[name]
        original = slot.get()
        if not original.is_meta:
            continue
        if original.is_floating_point():
            placeholder = torch.full(original.shape, float("nan"), dtype=original.dtype, device=device)
        elif original.dtype == torch.bool:
            placeholder = torch.zeros(original.shape, dtype=original.dtype, device=device)
        else:
            placeholder = torch.full(original.shape, torch.iinfo(original.dtype).min, dtype=original.dtype,
                                     device=device)
        handle.restores.append((slot, original))
        slot.set(placeholder)
        owners.setdefault(id(slot.module), (slot.module, []))[1].append((name, slot))
    if not owners:
        return
    init = getattr(model, "_init_weights", None)
    for module, entries in owners.values():
        if callable(init):
            with torch.no_grad():
                init(module)
        for name, slot in entries:
            value = slot.get()
            if value.is_floating_point():
                unset = bool(torch.isnan(value).any())
            elif value.dtype == torch.bool:
                unset = False
            else:
                unset = bool((value == torch.iinfo(value.dtype).min).any())
            if unset:
                raise CalibInputError(
                    f"{name} is a computed buffer of {type(module).__name__} that the model's _init_weights does "
                    "not fill, so sequential mode cannot rebuild it on a meta skeleton. Build the skeleton with "
                    "its buffers on the CPU (parameters on meta), or calibrate the model in memory.")
            handle.nbytes += value.numel() * value.element_size()


def materialise(model: nn.Module, names: list[str], load_weights: LoadWeights, device: torch.device,
                slots: dict[str, Slot] | None = None, canonical: dict[int, str] | None = None) -> Materialised:
    """Give the named tensors that are on ``meta`` real values on ``device``.

    Parameters and persistent buffers come from ``load_weights`` (requested by
    their canonical module-space names, tied tensors once, cast to the skeleton's
    dtype); a persistent buffer it does not return is computed like the
    non-persistent ones. Tensors that are already real are left alone, so a
    loaded model passes through untouched. Tied slots get one shared tensor.
    """
    slots = slots if slots is not None else tensor_slots(model)
    canonical = canonical if canonical is not None else canonical_names(model)
    handle = Materialised()
    wanted: dict[str, list[str]] = {}  # canonical name -> slot names sharing that tensor
    computed: list[str] = []
    for name in names:
        slot = slots[name]
        tensor = slot.get()
        if not tensor.is_meta:
            continue
        if slot.kind == "computed":
            computed.append(name)
        else:
            wanted.setdefault(canonical.get(id(tensor), name), []).append(name)
    try:
        loaded = load_weights(list(wanted)) if wanted else {}
        assign: list[tuple[list[str], torch.Tensor]] = []
        for key, slot_names in wanted.items():
            value = loaded.get(key)
            first = slots[slot_names[0]]
            original = first.get()
            if value is None:
                if first.kind == "param":
                    raise CalibInputError(f"the checkpoint has no tensor for {key} (module space), which "
                                          f"{type(model).__name__} needs: the weights do not match the model")
                computed.extend(slot_names)  # a persistent buffer the checkpoint lacks: computed, as on load
                continue
            if tuple(value.shape) != tuple(original.shape):
                raise CalibInputError(f"{key}: the checkpoint's tensor has shape {list(value.shape)}, the model "
                                      f"expects {list(original.shape)}")
            dtype = original.dtype if value.is_floating_point() else value.dtype
            value = value.to(device=device, dtype=dtype)
            assign.append((slot_names, nn.Parameter(value, requires_grad=False) if first.kind == "param" else value))
        del loaded
        _init_computed(model, slots, computed, device, handle)  # parameters still on meta: see there
        for slot_names, value in assign:
            for slot_name in slot_names:
                slot = slots[slot_name]
                handle.restores.append((slot, slot.get()))
                slot.set(value)
            handle.nbytes += value.numel() * value.element_size()
    except BaseException:
        handle.release()
        raise
    return handle
