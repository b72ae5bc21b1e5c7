"""Calibration: run the calibration set through the model with observers
attached, and keep what they learnt (module space: the model is the executor).

``calibrate`` runs whole-model forwards with every weight resident. With
``smoothquant`` in the recipe a first pass collects per-channel input ranges
and the model's weights are rescaled in place before the observing pass.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from calib.algorithms.smoothquant import apply_smoothing, describe, search_rows, smooth_pair, smoothing_pairs
from calib.data import CalibrationSet
from calib.errors import CalibInputError
from calib.hooks import InputGroup, observe, observing_cache
from calib.observers import ChannelMaxObserver, Observer, make_observer
from calib.quantize import Plan, plan_for
from calib.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """What calibration learnt: observers per targeted module and per KV layer."""

    plan: Plan
    input_observers: dict[str, Observer] = field(default_factory=dict)
    kv_observers: dict[int, tuple[Observer, Observer]] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0
    seconds: float = 0.0
    smoothed: int = 0  # SmoothQuant pairs rescaled (the model's weights changed in place)
    smoothing: dict = field(default_factory=dict)  # producer -> SmoothChoice (alpha used, searched errors)
    # MoE: experts module -> real calibration tokens the router sent to each expert (observing pass)
    expert_tokens: dict[str, list[int]] = field(default_factory=dict)
    all_experts: bool = False  # --moe-calibrate-all-experts: every expert observed every token
    # GPTQ: module name -> its rounded weight (calib.algorithms.gptq.Solved), for the writer
    solved: dict = field(default_factory=dict)
    gptq_fallbacks: dict[str, str] = field(default_factory=dict)  # module -> why it was rounded to nearest
    # module name -> a few calibration input rows (calib.observers.RowSampler), for each layer's output error
    samples: dict = field(default_factory=dict)


def _forward_kwargs(model: nn.Module, plan: Plan, kv: bool, session) -> dict:
    params = inspect.signature(model.forward).parameters
    kwargs = {}
    if "use_cache" in params:
        kwargs["use_cache"] = kv
    if kv:
        # transformers 5.24 renamed the argument (`past_key_values` -> `cache`); pass whichever it takes.
        key = "cache" if "cache" in params else "past_key_values"
        kwargs[key] = observing_cache(session, getattr(model, "config", None))
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_observed = head is not None and any(m is head for m in plan.targets.values())
    if "logits_to_keep" in params and not head_observed:
        kwargs["logits_to_keep"] = 1  # calibration needs no logits: skip most of the LM head's work
    return kwargs


def input_groups(plan: Plan, recipe: Recipe, calibration: Calibration) -> list[InputGroup]:
    """One observer per group of targeted modules that read the same input (fused
    siblings share one), for static activation recipes; registered in
    ``calibration.input_observers`` under every member's name."""
    groups: list[InputGroup] = []
    acts = recipe.input_activations
    if acts is not None and not acts.dynamic:
        for members in plan.input_groups():
            group = InputGroup(names=members, observer=make_observer(acts.observer, acts.observer_kwargs))
            groups.append(group)
            calibration.input_observers.update({m: group.observer for m in members})
    return groups


def sample_groups(plan: Plan, calibration: Calibration) -> list[InputGroup]:
    """A :class:`~calib.observers.RowSampler` per group of targets that read one
    input (registered in ``calibration.samples``), for each layer's output error."""
    from calib.observers import RowSampler

    groups = []
    for members in plan.input_groups():
        group = InputGroup(names=members, observer=RowSampler())
        groups.append(group)
        calibration.samples.update({m: group.observer for m in members})
    return groups


def calibrate(model: nn.Module, recipe: Recipe, data: CalibrationSet | None, batch_size: int = 8,
              pad_token_id: int = 0, progress: bool = True) -> Calibration:
    """Run the calibration set through the model with observers attached.

    Recipes with only dynamic activations (or none) need no data: the forward
    pass is skipped and ``data`` may be None. With ``smoothquant`` in the recipe
    a first pass collects per-channel ranges and the model's weights are
    rescaled in place (same function, flatter activations) before observing.
    """
    if recipe.gptq is not None:
        # GPTQ feeds each layer the quantized layers' outputs: the layer-by-layer executor, on the loaded model
        from calib.sequential import calibrate_sequential

        return calibrate_sequential(model, lambda names: {}, recipe, data, batch_size=batch_size,
                                    pad_token_id=pad_token_id, progress=progress)
    plan = plan_for(model, recipe)
    calibration = Calibration(plan=plan)
    if not recipe.needs_calibration:
        return calibration
    if data is None or not data.samples:
        raise CalibInputError(f"recipe {recipe.name!r} has static scales and needs calibration data")
    groups = input_groups(plan, recipe, calibration) + sample_groups(plan, calibration)
    if recipe.kv_cache is not None:
        calibration.kv_observers = {i: (Observer(), Observer()) for i in plan.attention}

    log.info("calibrating: %d samples in %d batches of up to %d", len(data.samples), data.num_batches(batch_size),
             batch_size)
    start = time.perf_counter()
    if recipe.smoothquant is not None:
        calibration.smoothed = _smooth(model, recipe, plan, data, batch_size, pad_token_id, progress,
                                       calibration.smoothing)
    if groups or calibration.kv_observers:
        with all_experts_observed(model, recipe) as calibration.all_experts:
            calibration.batches, calibration.tokens = _run_batches(
                model, plan, data, batch_size, pad_token_id, groups, calibration.kv_observers,
                kv=recipe.kv_cache is not None, progress=progress, desc="calibrate",
                expert_tokens=calibration.expert_tokens)
    _reduce_over_ranks(calibration, groups)
    calibration.seconds = time.perf_counter() - start
    return calibration


def _reduce_over_ranks(calibration: Calibration, groups: list[InputGroup]) -> None:
    """Several processes (torchrun): every rank's observers, routing counts and
    token counts become those of all ranks' batches (:mod:`calib.distributed`)."""
    from calib import distributed

    group = distributed.current()
    if group is None:
        return
    observers = [g.observer for g in groups] + [o for pair in calibration.kv_observers.values() for o in pair]
    distributed.reduce_states(group, observers)
    merged = distributed.reduce_counts(group, calibration.expert_tokens)
    calibration.expert_tokens.clear()
    calibration.expert_tokens.update(merged)
    calibration.batches = distributed.sum_int(group, calibration.batches)
    calibration.tokens = distributed.sum_int(group, calibration.tokens)


def local_batches(data: CalibrationSet, batch_size: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """This process's calibration batches: all of them, or under torchrun its rank's
    contiguous block of the very batches one process would run."""
    from calib import distributed

    return distributed.shard(list(data.batches(batch_size, pad_token_id)), distributed.current())


@contextlib.contextmanager
def all_experts_observed(model: nn.Module, recipe: Recipe):
    """``recipe.calibration.moe_calibrate_all_experts`` on the model's experts for
    the block; yields whether it applies (the model has experts and the recipe asks)."""
    from calib.moe import set_route_all

    wanted = recipe.calibration.moe_calibrate_all_experts
    applies = bool(set_route_all(model, wanted)) and wanted
    try:
        yield applies
    finally:
        set_route_all(model, False)


def _run_batches(model, plan, data, batch_size, pad_token_id, groups, kv_observers, kv, progress, desc,
                 expert_tokens=None):
    """Forward every batch with the observers attached; returns (batches, real tokens)."""
    device = next(model.parameters()).device
    batches = tokens = 0
    mine = local_batches(data, batch_size, pad_token_id)
    with torch.inference_mode(), observe(model, groups, kv_observers, expert_tokens) as session:
        bar = tqdm(mine, total=len(mine), desc=desc, unit="batch", disable=not progress)
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            session.set_mask(batch["attention_mask"])
            model(**batch, **_forward_kwargs(model, plan, kv, session))
            batches += 1
            tokens += int(batch["attention_mask"].sum())
    return batches, tokens


def _smooth(model, recipe, plan, data, batch_size, pad_token_id, progress, choices: dict) -> int:
    """SmoothQuant: a pass for per-channel input ranges (and, with ``alpha: search``,
    sampled input rows), then rescale the model in place; ``choices`` gets each pair's."""
    pairs = smoothing_pairs(model, plan.targets, recipe.smoothquant.mapping_list(),
                            kv_cache=recipe.kv_cache is not None)
    if not pairs:
        raise CalibInputError(f"recipe {recipe.name!r} asks for SmoothQuant, but {type(model).__name__} has no "
                              "SmoothQuant pairs (norm -> projections, up -> down, v -> o) among its quantized "
                              "layers (see calib.algorithms.smoothquant.DEFAULT_MAPPINGS; give smoothquant.mappings)")
    groups = [InputGroup(names=[pair.consumers[0]], observer=ChannelMaxObserver(search_rows(recipe)))
              for pair in pairs]
    _run_batches(model, plan, data, batch_size, pad_token_id, groups, {}, kv=False, progress=progress,
                 desc="smoothquant")
    from calib import distributed

    distributed.reduce_states(distributed.current(), [g.observer for g in groups])  # every rank's ranges
    probe = {k: v.to(next(model.parameters()).device) for k, v in next(data.batches(batch_size, pad_token_id)).items()}
    before = _layer_outputs(model, plan, probe)
    saved = _smoothed_parameters(model, pairs)
    for pair, group in zip(pairs, groups):
        if group.observer.observed:
            choices[pair.producer] = smooth_pair(model, pair, group.observer, recipe)
            apply_smoothing(model, pair, choices[pair.producer].scales)
    after = _layer_outputs(model, plan, probe)
    try:
        _check_layers(model, pairs, before, after)
    except CalibInputError:
        with torch.no_grad():
            for param, original in saved:
                param.copy_(original)  # the model as it was: nothing half-smoothed
        raise
    log.info("SmoothQuant (%s): rescaled %d norm/projection pairs", describe(choices), len(choices))
    return len(pairs)


def _smoothed_parameters(model: nn.Module, pairs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    names = {n for pair in pairs for n in [pair.producer, *pair.consumers]}
    return [(p, p.detach().clone()) for n in sorted(names) for p in model.get_submodule(n).parameters(recurse=False)]


def _layer_outputs(model: nn.Module, plan: Plan, batch: dict) -> list[torch.Tensor]:
    """Each decoder layer's output (first tensor) on one batch."""
    from calib.layers import find_decoder_layers
    from calib.hooks import ObservationSession

    layers = find_decoder_layers(model).layers
    outputs: list[torch.Tensor] = []

    def keep(module, args, out):
        first = out[0] if isinstance(out, (tuple, list)) else out
        outputs.append(first.detach().float().clone())

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        with torch.inference_mode():
            model(**batch, **_forward_kwargs(model, plan, False, ObservationSession()))
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _check_layers(model: nn.Module, pairs, before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    """The first layer whose output moved beyond float rounding names its pairs
    (a layer after it moves only because its input did)."""
    from calib.algorithms.smoothquant import check_preserved, relative_change
    from calib.layers import find_decoder_layers

    layout = find_decoder_layers(model)
    dtype = next(model.parameters()).dtype
    for index, (b, a) in enumerate(zip(before, after)):
        change = relative_change(b, a)
        mine = [p for p in pairs if layout.layer_of(p.producer) == index]
        check_preserved(layout.layer_name(index), mine or pairs, change, dtype)
