"""Which modules are quantized, and their quantized tensors.

The result of quantization is *data*: an ordered stream of ``(name, tensor)``
pairs in the checkpoint's naming (``X.weight`` int8/fp8, ``X.weight_scale``,
``X.input_scale``, ``...self_attn.k_scale``), never module surgery on the model.
Export writes that stream; the model in memory stays a plain float model.

The plan (:func:`plan_for`) and the per-layer math (:func:`_quantize_layer`)
live here, in module space; the stream itself is
:func:`calib.stream.quantized_stream`, in checkpoint space (source names,
source order). :func:`quantized_tensors` runs it over the model in memory;
:func:`quantized_module_tensors` is the module-space reference it is tested
against.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from calib import qmath
from calib.errors import CalibInputError
from calib.hooks import attention_modules
from calib.observers import Observer, weight_amax_mse
from calib.recipe import QuantArgs, Recipe

log = logging.getLogger(__name__)

# Group sizes suggested when a recipe's does not divide some layer's width.
GROUP_SIZE_CHOICES = (16, 32, 64, 128, 256)
# Layers named in an error message before "and N more".
SHOWN_LAYERS = 4

# Sibling projections that vLLM/SGLang load into one fused GEMM. They read the
# same input, so they must share input scales; FP8 per-tensor weight scales are
# shared too (vLLM would otherwise re-quantize every shard to the largest one).
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),  # BERT-style attention
    ("w1", "w3"),  # Mixtral-style experts
)


def matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """compressed-tensors matching: exact module name, ``re:`` regex (``re.match``,
    anchored at the start), or module class name."""
    return any(_matches_one(name, module, pattern) for pattern in patterns)


def _matches_one(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    # a class name matches subclasses too (Falcon's FalconLinear is a Linear), as in compressed-tensors
    return pattern == name or any(pattern == cls.__name__ for cls in type(module).__mro__)


def _names_module(name: str, patterns: list[str]) -> bool:
    """Whether an entry names the module itself (exactly or by regex), not its class."""
    return any(p == name or (p.startswith("re:") and re.match(p[3:], name)) for p in patterns)


def tied_to_input_embeddings(model: nn.Module, name: str, module: nn.Module) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return emb is not None and getattr(emb, "weight", None) is getattr(module, "weight", None)


@dataclass
class Plan:
    """The modules a recipe quantizes in one model, and how they group."""

    targets: dict[str, nn.Linear]
    ignored: list[str]  # targeted-by-class modules left in high precision
    fused: list[list[str]]  # groups of sibling names served as one GEMM
    attention: dict[int, str] = field(default_factory=dict)  # layer_idx -> attention module name
    # recipe entries that match no module, as "targets: X" / "ignore: X" (each also logged as a warning)
    unmatched: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)  # MoE routers/gates kept in high precision (in ignored too)
    # modules the recipe targets that calib cannot quantize, left in high precision because the
    # recipe's ignore names them: "name (Class): why"
    unsupported_ignored: list[str] = field(default_factory=list)
    targeted_parameters: int = 0  # weight elements the recipe targets (its ignore, routers, tied heads excluded)

    @property
    def quantized_parameters(self) -> int:
        return sum(m.weight.numel() for m in self.targets.values())

    def coverage(self) -> dict:
        """Planned ÷ targeted weight elements; the report replaces "quantized" by what was written."""
        quantized = self.quantized_parameters
        total = max(self.targeted_parameters, quantized)
        return {"quantized_parameters": quantized, "targeted_parameters": total,
                "ratio": round(quantized / total, 6) if total else 1.0,
                "left_in_high_precision": sorted(set(self.ignored) - set(self.routers)),
                "routers_in_high_precision": list(self.routers),
                "unsupported_ignored": list(self.unsupported_ignored)}

    def input_groups(self) -> list[list[str]]:
        """The targets grouped by the input they read (fused siblings together), in target order."""
        groups, done = [], set()
        for name in self.targets:
            if name not in done:
                members = self.group_of(name)
                done.update(members)
                groups.append(members)
        return groups

    def group_of(self, name: str) -> list[str]:
        for group in self.fused:
            if name in group:
                return group
        return [name]


def plan_for(model: nn.Module, recipe: Recipe, warn: bool = True) -> Plan:
    """Which modules ``recipe`` quantizes in ``model``, checked against the model's shapes.

    Reads names, classes and shapes only, never a weight value: it runs on a model
    built on the ``meta`` device, so a recipe that cannot fit the model (a group
    size that does not divide a layer) fails before any weight is loaded.
    ``warn=False`` keeps that early plan quiet (the real one warns).
    """
    from calib.moe import is_router, unfuse_experts, unsupported_weights

    unfuse_experts(model)  # fused MoE experts -> per-expert Linear projections (idempotent)
    targets: dict[str, nn.Linear] = {}
    ignored: list[str] = []
    routers: list[str] = []
    targeted = 0
    hits: set[tuple[str, str]] = set()  # (field, entry) that matched some module
    for name, module in model.named_modules():
        if not name:
            continue
        by_target = [p for p in recipe.targets if _matches_one(name, module, p)]
        by_ignore = [p for p in recipe.ignore if _matches_one(name, module, p)]
        hits.update(("targets", p) for p in by_target)
        hits.update(("ignore", p) for p in by_ignore)
        if not isinstance(module, nn.Linear) and is_router(model, name):
            routers.append(name)  # a router module of its own class (MixtralTopKRouter): listed in ignore
            ignored.append(name)
            continue
        if not by_target:
            continue
        if not isinstance(module, nn.Linear):
            log.debug("target %s matched %s (not a Linear): skipped", name, type(module).__name__)
            continue
        if is_router(model, name) and not _names_module(name, recipe.targets):
            log.debug("%s is an MoE router: left in high precision", name)
            routers.append(name)
            ignored.append(name)
            continue
        if tied_to_input_embeddings(model, name, module):
            log.info("%s shares its weight with the input embeddings: left in high precision", name)
            ignored.append(name)
            continue
        if by_ignore:
            ignored.append(name)
            continue
        targeted += module.weight.numel()
        targets[name] = module
    unsupported_ignored = _check_unsupported(model, recipe, unsupported_weights(model))
    unmatched = _unmatched_entries(model, recipe, hits, logging.WARNING if warn else logging.DEBUG)
    if not targets:
        raise CalibInputError(
            f"recipe targets {recipe.targets} (minus ignore {recipe.ignore}) match no Linear module in "
            f"{type(model).__name__}. Check the targets/ignore fields of the recipe."
        )
    if recipe.weights.strategy == "group":
        _check_group_size(targets, recipe.weights.group_size)
    fused = _fused_groups(targets, ignored)
    attention = {}
    if recipe.kv_cache is not None:
        attention = attention_modules(model)
        latent = [n for n in attention.values() if hasattr(model.get_submodule(n), "kv_a_proj_with_mqa")]
        if latent:
            raise CalibInputError(
                f"recipe {recipe.name!r} asks for FP8 KV-cache scales, but {type(model).__name__} uses multi-head "
                f"latent attention ({latent[0]} and {len(latent) - 1} more): serving stacks cache its compressed "
                "latent, not the keys and values transformers hands its cache, and vLLM loads no per-layer k/v "
                "scale for it. Use a recipe without kv_cache (fp8-static).")
        if not attention:
            raise CalibInputError(
                f"recipe {recipe.name!r} asks for FP8 KV-cache scales, but {type(model).__name__} has no "
                "decoder attention modules with a KV cache (an encoder?). Use a recipe without kv_cache."
            )
    return Plan(targets=targets, ignored=ignored, fused=fused, attention=attention, unmatched=unmatched,
                routers=routers, unsupported_ignored=unsupported_ignored, targeted_parameters=targeted)


def _check_unsupported(model: nn.Module, recipe: Recipe, found: list[tuple[str, str, str]]) -> list[str]:
    """Projection-like modules calib cannot quantize (fused experts it cannot split,
    Conv1D, ...): an error naming each, unless the recipe's ``ignore`` names it (then
    it is left in high precision and listed). A recipe that targets only other modules
    by name is not concerned."""
    by_class = any(not p.startswith("re:") and "." not in p and p[:1].isupper() for p in recipe.targets)
    problems, ignored = [], []
    for name, cls, why in found:
        module = model.get_submodule(name)
        targeted = by_class or any(_matches_one(name, module, p) for p in recipe.targets)
        if not targeted:
            continue
        if any(_matches_one(name, module, p) for p in recipe.ignore):
            ignored.append(f"{name} ({cls}): {why}")
            log.warning("%s (%s) cannot be quantized (%s): left in high precision, as the recipe's ignore asks",
                        name, cls, why)
            continue
        problems.append(f"{name} ({cls}): {why}")
    if problems:
        shown = "; ".join(problems[:SHOWN_LAYERS]) + (f"; and {len(problems) - SHOWN_LAYERS} more"
                                                      if len(problems) > SHOWN_LAYERS else "")
        raise CalibInputError(
            f"{type(model).__name__} has weights the recipe targets that calib cannot quantize: {shown}. calib "
            "never writes a partly quantized model silently: add these modules to the recipe's ignore to leave "
            "them in high precision (they are listed in the checkpoint's ignore and the report), or use a model "
            "layout calib supports.")
    return ignored


def _unmatched_entries(model: nn.Module, recipe: Recipe, hits: set[tuple[str, str]],
                       level: int = logging.WARNING) -> list[str]:
    """Warn about each targets/ignore entry that matches no module, and list them.

    A pattern written for a server's fused names (``re:.*qkv_proj``) matches none
    of the Hugging Face modules calib sees, and would silently quantize what the
    user meant to skip. The default ``lm_head`` entry on a model without one (an
    encoder) is expected: info only.
    """
    example = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), None)
    unmatched = []
    for field_name, entries in (("targets", recipe.targets), ("ignore", recipe.ignore)):
        for entry in dict.fromkeys(entries):
            if (field_name, entry) in hits:
                continue
            if field_name == "ignore" and entry == "lm_head":
                log.log(min(level, logging.INFO), "ignore entry 'lm_head' matches no module: %s has no LM head", type(model).__name__)
                continue
            effect = "quantizes nothing" if field_name == "targets" else "leaves nothing in high precision"
            log.log(level, "recipe %s entry %r matches no module of %s, so it %s. Entries match calib's module names "
                        "(e.g. %r) or class names, not a server's fused names (qkv_proj, gate_up_proj): fix or "
                        "remove it.", field_name, entry, type(model).__name__, effect, example)
            unmatched.append(f"{field_name}: {entry}")
    return unmatched


def group_sizes_dividing(widths: set[int], choices: tuple[int, ...] = GROUP_SIZE_CHOICES) -> list[int]:
    """The group sizes among ``choices`` that divide every width."""
    return [g for g in choices if all(w % g == 0 for w in widths)]


def _check_group_size(targets: dict[str, nn.Linear], group_size: int) -> None:
    """Group scales split each row's ``in_features`` into whole groups: refuse a
    size that does not divide a targeted layer, from shapes alone."""
    bad = [(name, module.in_features) for name, module in targets.items() if module.in_features % group_size]
    if not bad:
        return
    shown = ", ".join(f"{name} ({width})" for name, width in bad[:SHOWN_LAYERS])
    more = f" and {len(bad) - SHOWN_LAYERS} more" if len(bad) > SHOWN_LAYERS else ""
    fits = group_sizes_dividing({module.in_features for module in targets.values()})
    lo, hi = GROUP_SIZE_CHOICES[0], GROUP_SIZE_CHOICES[-1]
    if fits:
        fix = (f"The group sizes that divide every targeted layer's width: {', '.join(map(str, fits))}; set "
               "weights.group_size to one of them.")
    else:
        fix = (f"There is no group size from {lo} to {hi} that divides every targeted layer's width: use "
               "weights.strategy: channel, or ignore the layers listed.")
    raise CalibInputError(
        f"weights.group_size {group_size} does not divide the input width of {len(bad)} targeted "
        f"layer{'s' if len(bad) > 1 else ''}: {shown}{more}; each row must split into whole groups. {fix}"
    )


def _fused_groups(targets: dict[str, nn.Linear], ignored: list[str]) -> list[list[str]]:
    groups = []
    candidates = set(targets) | set(ignored)
    parents = {name.rpartition(".")[0] for name in candidates}
    for parent in sorted(parents):
        for siblings in FUSED_SIBLINGS:
            names = [f"{parent}.{s}" if parent else s for s in siblings]
            present = [n for n in names if n in candidates]
            if len(present) < 2:
                continue
            quantized = [n for n in present if n in targets]
            if quantized and len(quantized) != len(present):
                skipped = sorted(set(present) - set(quantized))
                raise CalibInputError(
                    f"ignore leaves {skipped} in high precision but quantizes {quantized}: serving stacks fuse "
                    "these into one GEMM and need one scheme for all of them. Ignore all or none."
                )
            if quantized:
                groups.append(quantized)
    return groups


def nonfinite_weight_error(name: str, w: torch.Tensor) -> CalibInputError:
    """The error for a weight holding NaN/Inf (counted only once one is known to be there)."""
    nan = int(torch.isnan(w).sum())
    bad = int((~torch.isfinite(w)).sum())
    return CalibInputError(
        f"{name}.weight holds {bad} non-finite value{'s' if bad != 1 else ''} ({nan} NaN, {bad - nan} Inf) of "
        f"{w.numel()}: quantizing it would export garbage. The model's weights are damaged (or were converted "
        "with an overflow): check the model file, or re-download or re-convert it."
    )


def finite_amax(name: str, w: torch.Tensor, strategy: str, group_size: int | None = None) -> torch.Tensor:
    """``max |w|`` per scale, refusing NaN/Inf: the reduction propagates them, so
    checking its few values is the cheap test of the whole weight."""
    amax = qmath.amax_per_strategy(w, strategy, group_size)
    if not torch.isfinite(amax).all():
        raise nonfinite_weight_error(name, w)
    return amax


def weight_amax(w: torch.Tensor, args: QuantArgs, name: str = "weight") -> torch.Tensor:
    """The clipping range of a weight at the scheme's granularity (``name`` for errors)."""
    amax = finite_amax(name, w, args.strategy, args.group_size)
    if args.observer == "mse":
        qmax = qmath.qmax_for(args.num_bits, args.is_fp8)
        search = {"grid": int(args.observer_kwargs.get("grid", 40)),
                  "norm": float(args.observer_kwargs.get("norm", 2.0))}
        if args.strategy == "group":
            rows = w.reshape(-1, args.group_size)
            return weight_amax_mse(rows, amax.reshape(-1, 1), qmax, args.is_fp8, **search).reshape(amax.shape)
        return weight_amax_mse(w, amax, qmax, args.is_fp8, **search)
    return amax


def quantize_weight(w: torch.Tensor, args: QuantArgs, amax: torch.Tensor,
                    scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, stored_scale)``: the weight quantized with exactly the scale as stored."""
    qmax = qmath.qmax_for(args.num_bits, args.is_fp8)
    scale = qmath.storage_scale(qmath.symmetric_scale(amax, qmax), scale_dtype)
    full = qmath.expand_scale(scale.to(torch.float32), w.shape, args.strategy, args.group_size)
    if args.is_fp8:
        q = qmath.quantize_fp8(w, full)
    else:
        q = qmath.quantize_int(w, full, qmin=-int(qmax) - 1, qmax=int(qmax))
    return q, scale


# Quantizing a weight in blocks of rows of about this many float32 bytes keeps
# every intermediate in the CPU's cache: the elementwise steps give the same bits
# as on the whole tensor, at a third of the time (memory traffic dominates).
ROW_BLOCK_BYTES = 1 << 20
# The weight SQNR of a large weight is measured on every SQNR_EVERY-th block of
# rows (all blocks when there are at most SQNR_EVERY): measuring the error costs
# about as much as quantizing, and an eighth of the rows, spread over the whole
# tensor, estimates a layer's SQNR to well under 0.1 dB.
SQNR_EVERY = 8


@dataclass(frozen=True)
class QuantizedWeight:
    q: torch.Tensor
    scale: torch.Tensor  # as stored
    sqnr_db: float  # over ``sqnr_rows`` rows
    sqnr_rows: int


def quantize_weight_sqnr(w: torch.Tensor, args: QuantArgs, amax: torch.Tensor,
                         scale_dtype: torch.dtype) -> QuantizedWeight:
    """:func:`quantize_weight`'s ``q`` and scale, bit for bit, and the weight's
    SQNR (:func:`calib.qmath.sqnr_db`; float32 within a block, float64 across),
    computed block of rows by block of rows on the CPU (one block on other
    devices). Per-row and per-group scales never cross a row, and a per-tensor
    scale is one number, so every block sees exactly its scales. The SQNR is
    measured on the rows of every :data:`SQNR_EVERY`-th block (all of a weight of
    at most that many blocks); ``sqnr_rows`` says how many."""
    qmax = qmath.qmax_for(args.num_bits, args.is_fp8)
    scale = qmath.storage_scale(qmath.symmetric_scale(amax, qmax), scale_dtype)
    scale32 = scale.to(torch.float32)
    rows, cols = w.shape
    step = max(1, ROW_BLOCK_BYTES // (4 * max(cols, 1))) if w.device.type == "cpu" else rows
    every = SQNR_EVERY if rows > SQNR_EVERY * step else 1
    per_row = scale32.dim() == 2 and scale32.shape[0] == rows
    q = torch.empty(w.shape, dtype=qmath.FP8_DTYPE if args.is_fp8 else torch.int8, device=w.device)
    noise = torch.zeros((), dtype=torch.float64, device=w.device)
    signal = torch.zeros((), dtype=torch.float64, device=w.device)
    measured = 0
    for number, start in enumerate(range(0, rows, step)):
        x = w[start:start + step]
        s = scale32[start:start + step] if per_row else scale32
        full = qmath.expand_scale(s, x.shape, args.strategy, args.group_size)
        ref = x.to(torch.float32)  # a view when w is float32: never modified in place
        if args.is_fp8:  # qmath.quantize_fp8, with the float32 copy shared with the error below
            block = (ref / full).clamp_(-qmath.FP8_MAX, qmath.FP8_MAX).to(qmath.FP8_DTYPE)
        else:
            block = qmath.quantize_int(x, full, qmin=-int(qmax) - 1, qmax=int(qmax))
        q[start:start + step] = block
        if number % every:
            continue
        error = _as_float32(block).mul_(full).sub_(ref).reshape(-1)
        flat = ref.reshape(-1)
        noise += torch.dot(error, error).to(torch.float64)
        signal += torch.dot(flat, flat).to(torch.float64)
        measured += x.shape[0]
    sqnr = float("inf") if float(noise) == 0 else float(10.0 * torch.log10(signal / noise))
    return QuantizedWeight(q, scale, sqnr, measured)


_FP8_VALUES: dict[torch.device, torch.Tensor] = {}


def _as_float32(q: torch.Tensor) -> torch.Tensor:
    """``q.to(float32)``, exactly; FP8 through a 256-entry table of its values
    (torch's FP8 -> float32 cast on the CPU is ~5x slower than the lookup)."""
    if q.dtype != qmath.FP8_DTYPE or q.device.type != "cpu":
        return q.to(torch.float32)
    table = _FP8_VALUES.get(q.device)
    if table is None:
        table = _FP8_VALUES[q.device] = torch.arange(256, dtype=torch.uint8).view(qmath.FP8_DTYPE).to(torch.float32)
    return torch.take(table, q.view(torch.uint8).to(torch.int64))


def _pack_rows(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """:func:`calib.qmath.pack_int32` block of rows by block of rows (rows pack
    independently: the same words, without int64 temporaries of the whole weight)."""
    rows, cols = q.shape
    step = max(1, ROW_BLOCK_BYTES // (8 * max(cols, 1))) if q.device.type == "cpu" else rows
    if step >= rows:
        return qmath.pack_int32(q, num_bits)
    return torch.cat([qmath.pack_int32(q[i:i + step], num_bits) for i in range(0, rows, step)])


@dataclass
class LayerStats:
    name: str
    shape: list[int]
    weight_sqnr_db: float
    weight_amax: float
    weight_sqnr_rows: int = 0  # rows the SQNR was measured on (quantize.SQNR_EVERY)
    input_amax: float | None = None
    input_scale: float | None = None
    observed_tokens: int | None = None
    note: str = ""
    # ||fq(X) Wq^T - X W^T|| / ||X W^T|| on sampled calibration input rows (RowSampler):
    # the layer's output as served (activations quantized too) against float
    output_error: float | None = None
    output_error_rows: int = 0
    # GPTQ: the same from the weights alone, over every calibration token (from the Hessian),
    # GPTQ and round-to-nearest
    gptq_error: float | None = None
    gptq_error_rtn: float | None = None


@dataclass
class QuantizeResult:
    """Filled while :func:`quantized_tensors` is consumed."""

    layers: list[LayerStats] = field(default_factory=list)
    kv_scales: dict[str, dict[str, float]] = field(default_factory=dict)
    unobserved: list[str] = field(default_factory=list)
    seconds: float = 0.0
    work_by_rank: dict[str, int] = field(default_factory=dict)  # several processes: weights each rank quantized


def coverage_report(plan: Plan, result: QuantizeResult) -> dict:
    """Quantized ÷ targeted weight elements, counted from what was written. Every
    targeted weight is quantized or the run stops: anything else is a bug, and
    calib would rather fail than exit 0 with a partly quantized checkpoint."""
    section = plan.coverage()
    written = sum(_numel(layer.shape) for layer in result.layers)
    section["quantized_parameters"] = written
    section["ratio"] = round(written / section["targeted_parameters"], 6) if section["targeted_parameters"] else 1.0
    if written != section["targeted_parameters"]:
        missing = sorted(set(plan.targets) - {layer.name for layer in result.layers})
        raise RuntimeError(f"calib quantized {written} of the {section['targeted_parameters']} weight elements it "
                           f"planned (not written: {missing[:SHOWN_LAYERS]}): this is a bug in calib; the checkpoint "
                           "was not published")
    return section


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _shared_fallback(name: str, observed: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """For a module that saw no tokens (an MoE expert nobody routed to): the
    largest input range of its same-role siblings (same name up to the last index)."""
    indices = list(re.finditer(r"\.\d+\.", name))
    if not indices:
        return None
    last = indices[-1]
    pattern = re.escape(name[: last.start()]) + r"\.\d+\." + re.escape(name[last.end():])
    siblings = [amax for other, amax in observed.items() if other != name and re.fullmatch(pattern, other)]
    return torch.stack(siblings).max() if siblings else None


def activation_amax(plan: Plan, observers: dict[str, Observer], args: QuantArgs,
                    result: QuantizeResult) -> dict[str, torch.Tensor]:
    """Input clipping range per targeted module (fused siblings share one)."""
    qmax = qmath.qmax_for(args.num_bits, args.is_fp8)
    observed = {name: obs.amax(qmax, args.is_fp8) for name, obs in observers.items() if obs.observed}
    amax: dict[str, torch.Tensor] = {}
    for name in plan.targets:
        if name in observed:
            amax[name] = observed[name]
            continue
        fallback = _shared_fallback(name, observed)
        if fallback is None:
            raise CalibInputError(
                f"{name} received no calibration tokens, so it has no static input scale. Use more or longer "
                "calibration samples, ignore the module, or a recipe with dynamic activations."
            )
        result.unobserved.append(name)
        log.warning("%s received no calibration tokens: using the largest input range of its siblings", name)
        amax[name] = fallback
    return amax


def quantized_tensors(
    model: nn.Module,
    recipe: Recipe,
    plan: Plan,
    input_observers: dict[str, Observer] | None = None,
    kv_observers: dict[int, tuple[Observer, Observer]] | None = None,
    result: QuantizeResult | None = None,
    solved: dict | None = None,
    samples: dict | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's checkpoint, quantized where planned: the model in memory as a
    :class:`calib.checkpoint.StateDictSource` through
    :func:`calib.stream.quantized_stream` (checkpoint names as ``save_pretrained``
    writes them, ``state_dict`` order, KV scales last).

    Tensors that are not quantized keep their dtype. Tied weights are written
    once (under their first name); loaders re-tie them from the config.
    """
    from calib.checkpoint import NameMap, StateDictSource
    from calib.stream import quantized_stream

    source = StateDictSource(model)
    yield from quantized_stream(source, NameMap.for_model(model, source), plan, recipe, input_observers,
                                kv_observers, result=result, solved=solved, samples=samples)


def quantized_module_tensors(
    model: nn.Module,
    recipe: Recipe,
    plan: Plan,
    input_observers: dict[str, Observer] | None = None,
    kv_observers: dict[int, tuple[Observer, Observer]] | None = None,
    result: QuantizeResult | None = None,
    solved: dict | None = None,
    samples: dict | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The module-space reference: ``model.state_dict()`` quantized where planned,
    under the *module's* names, in ``state_dict`` order.

    This is the in-memory computation calib exported before the checkpoint-space
    stream existed; the tests prove :func:`calib.stream.quantized_stream` gives
    the same tensors bit for bit (names differing only where transformers
    renames on load). Tensors that are not quantized keep their dtype. Tied
    weights are written once (under their first name).
    """
    result = result if result is not None else QuantizeResult()
    w_args, a_args = recipe.weights, recipe.input_activations
    static_inputs = a_args is not None and not a_args.dynamic
    input_amax = activation_amax(plan, input_observers or {}, a_args, result) if static_inputs else {}

    shared_weight_amax: dict[str, torch.Tensor] = {}
    for group in plan.fused:
        shared_weight_amax.update(fused_weight_amax(w_args, group, [plan.targets[n].weight for n in group]))

    kv_by_attention = {}
    for layer_idx, attn_name in plan.attention.items():
        kv_by_attention[attn_name] = (kv_observers or {}).get(layer_idx)

    seen_storage: set[tuple[int, tuple[int, ...]]] = set()
    weight_names = {f"{name}.weight": name for name in plan.targets}
    for key, tensor in model.state_dict(keep_vars=False).items():
        storage = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and storage in seen_storage:
            continue  # a tied weight already written under another name
        seen_storage.add(storage)
        module_name = weight_names.get(key)
        if module_name is None:
            yield key, tensor
            continue
        start = time.perf_counter()
        yield from _quantize_layer(module_name, tensor, recipe, input_amax, shared_weight_amax,
                                   input_observers or {}, result, solved=solved, samples=samples)
        result.seconds += time.perf_counter() - start

    start = time.perf_counter()
    for attn_name, observers in kv_by_attention.items():
        if observers is None or not observers[0].observed:
            raise CalibInputError(f"{attn_name}: no key/value states were observed, so no KV-cache scale. "
                                  "Calibrate with at least one sample.")
        scales = {}
        dtype = _module_dtype(model, attn_name)
        for which, obs in zip(("k", "v"), observers):
            scale = qmath.storage_scale(qmath.symmetric_scale(obs.absmax().reshape(1), qmath.FP8_MAX), dtype)
            scales[f"{which}_scale"] = float(scale)
            yield f"{attn_name}.{which}_scale", scale
        result.kv_scales[attn_name] = scales
    result.seconds += time.perf_counter() - start


def _module_dtype(model: nn.Module, name: str) -> torch.dtype:
    module = model.get_submodule(name)
    for p in module.parameters():
        return p.dtype
    return torch.float32


def solved_weight(weight: torch.Tensor, args: QuantArgs, solved) -> QuantizedWeight:
    """A weight GPTQ rounded (:class:`calib.algorithms.gptq.Solved`) as a
    :class:`QuantizedWeight`: its stored values and scale, and its SQNR against
    ``weight`` (the float weight it was solved from), on every row."""
    if tuple(solved.q.shape) != tuple(weight.shape):
        raise RuntimeError(f"GPTQ solved a {list(solved.q.shape)} weight for a {list(weight.shape)} one: a bug in calib")
    q = solved.q.to(weight.device)
    scale = solved.scale.to(device=weight.device, dtype=weight.dtype)
    full = qmath.expand_scale(scale.to(torch.float32), weight.shape, args.strategy, args.group_size)
    sqnr = qmath.sqnr_db(weight.to(torch.float32), _as_float32(q) * full)
    return QuantizedWeight(q, scale, sqnr, weight.shape[0])


def shares_fused_scale(args: QuantArgs) -> bool:
    """Whether fused siblings (q/k/v, gate/up) get one weight scale, the group's
    largest: FP8 per-tensor weights unless the recipe asks for one per shard."""
    return args.is_fp8 and args.strategy == "tensor" and args.fused_scale == "shared"


def fused_weight_amax(args: QuantArgs, group: list[str], weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> the fused group's largest ``max |w|`` where the siblings share one
    weight scale (:func:`shares_fused_scale`); empty otherwise."""
    if not shares_fused_scale(args) or len(group) < 2:
        return {}
    top = torch.stack([finite_amax(n, w.detach(), "tensor") for n, w in zip(group, weights)]).max()
    return {n: top.reshape(1) for n in group}


def weight_scale(weight: torch.Tensor, args: QuantArgs, name: str, shared_weight_amax: dict) -> tuple:
    """(amax, stored scale) of one weight: the fused group's shared range where
    there is one, else the recipe's weight observer on the weight."""
    amax = shared_weight_amax.get(name)
    if amax is None:
        amax = weight_amax(weight, args, name)
    qmax = qmath.qmax_for(args.num_bits, args.is_fp8)
    return amax, qmath.storage_scale(qmath.symmetric_scale(amax, qmax), weight.dtype)


def _quantize_layer(name, weight, recipe, input_amax, shared_weight_amax, input_observers, result, prefix=None,
                    solved=None, samples=None):
    """The tensors of one targeted Linear ``name`` (module space), named under
    ``prefix`` (its checkpoint-space name; ``name`` by default). ``solved``:
    module name -> what GPTQ rounded (used as it is, on the scale it chose)."""
    w_args, a_args = recipe.weights, recipe.input_activations
    out = prefix or name
    dtype = weight.dtype
    gptq = (solved or {}).get(name)
    if gptq is not None:
        quantized = solved_weight(weight, w_args, gptq)
        amax = quantized.scale.to(torch.float32) * qmath.qmax_for(w_args.num_bits, w_args.is_fp8)
    else:
        amax = shared_weight_amax.get(name)
        if amax is None:
            amax = weight_amax(weight, w_args, name)
        quantized = quantize_weight_sqnr(weight, w_args, amax, dtype)
    q, scale = quantized.q, quantized.scale
    stats = LayerStats(
        name=name,
        shape=list(weight.shape),
        weight_sqnr_db=round(quantized.sqnr_db, 2),
        weight_amax=float(amax.max()),
        weight_sqnr_rows=quantized.sqnr_rows,
    )
    if gptq is not None:
        stats.gptq_error = round(gptq.output_error, 6)
        stats.gptq_error_rtn = round(gptq.output_error_rtn, 6)
    if recipe.format == "pack-quantized":
        yield f"{out}.weight_packed", _pack_rows(q, w_args.num_bits)
        yield f"{out}.weight_scale", scale
        yield f"{out}.weight_shape", torch.tensor(list(weight.shape), dtype=torch.int64)
    else:
        yield f"{out}.weight", q
        yield f"{out}.weight_scale", scale
    if name in input_amax:
        qmax = qmath.qmax_for(a_args.num_bits, a_args.is_fp8)
        obs = input_observers.get(name)
        if a_args.symmetric:
            in_scale = qmath.storage_scale(qmath.symmetric_scale(input_amax[name].reshape(1), qmax), dtype)
            yield f"{out}.input_scale", in_scale
        else:
            if obs is None or not obs.observed:
                raise CalibInputError(f"{name} received no calibration tokens: no asymmetric input range")
            in_scale, zero_point = qmath.asymmetric_qparams(obs.min_val.reshape(1), obs.max_val.reshape(1))
            in_scale = qmath.storage_scale(in_scale, dtype)
            yield f"{out}.input_scale", in_scale
            yield f"{out}.input_zero_point", zero_point
        stats.input_amax = float(input_amax[name])
        stats.input_scale = float(in_scale)
        if obs is not None:
            stats.observed_tokens = obs.count
        else:
            stats.note = "no tokens observed: sibling range used"
    sampler = (samples or {}).get(name)
    if sampler is not None and sampler.observed:
        static = (in_scale, zero_point if a_args is not None and not a_args.symmetric else None) \
            if name in input_amax else (None, None)
        stats.output_error = round(layer_output_error(sampler.rows, weight, q, scale, w_args, a_args, *static), 6)
        stats.output_error_rows = int(sampler.rows.shape[0])
    result.layers.append(stats)


def layer_output_error(x: torch.Tensor, weight: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       w_args: QuantArgs, a_args: QuantArgs | None, input_scale: torch.Tensor | None = None,
                       input_zero_point: torch.Tensor | None = None) -> float:
    """``||fq(x) deq(q)^T - x w^T|| / ||x w^T||`` (Frobenius, float32): one Linear's
    output as the server computes it (activations quantized as the scheme says,
    static with the stored scale, dynamic from ``x``) against the float layer, on
    input rows ``x`` [n, in]. Bias left out: it is not quantized."""
    from calib.emulate import fake_quantize_activation

    x = x.to(device=weight.device, dtype=torch.float32)
    full = qmath.expand_scale(scale.to(torch.float32), weight.shape, w_args.strategy, w_args.group_size)
    deq = _as_float32(q) * full
    xq = x if a_args is None else fake_quantize_activation(x, a_args, input_scale, input_zero_point)
    reference = x @ weight.to(torch.float32).T
    norm = float(torch.linalg.vector_norm(reference))
    return float(torch.linalg.vector_norm(xq @ deq.T - reference)) / norm if norm > 0 else 0.0
