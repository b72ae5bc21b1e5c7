"""A quantized checkpoint computed as the serving stack computes it, in PyTorch.

:func:`calib.load` dequantizes the weights and runs everything else in float,
which is optimistic for W8A8 and KV-cache schemes. :func:`load_served` builds
the model the way vLLM runs a compressed-tensors checkpoint (read from vLLM
0.32/0.33's compressed-tensors schemes, ``w8a8_utils``, ``fused_moe`` and
``kv_cache``; ``../shared/VLLM-LOADER-NOTES.md`` sums them up):

* **Weights exactly as stored**, dequantized in float32 (``q * scale``, minus
  the zero point where there is one).
* **Fused shards** (q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj``, an
  expert's w1/w3): FP8 per-tensor weights are re-quantized to the largest shard
  scale (``requantize_with_max_scale``: each shard dequantized in float16 with
  its own scale, then cast to FP8 with the largest); static FP8 input scales
  become their maximum. INT8 per-tensor weight scales are expanded per channel
  (exact, nothing to do). vLLM keeps a single INT8 static input scale for a
  fused layer; shards that disagree are reported and emulated with the largest.
* **MoE experts** with static input scales: vLLM's fused-MoE kernels take one
  input scale per layer for w1/w3 and one for w2, the maximum over experts.
* **Activations** quantized on entry to every quantized Linear: static scales
  as stored (``clamp(x / s)`` cast to FP8, or rounded and clamped to INT8 with
  the zero point); dynamic per token (``amax(row) / qmax``) or per tensor.
* **KV cache**: keys (after rotary embedding) and values are cast to FP8 with
  ``k_scale`` / ``v_scale`` where they enter the cache, and attention reads them
  back from it (vLLM's attention reads the cache, prefill included).

Not emulated (documented differences): the GEMM runs in float32 here, not in
FP8/INT8 with float32 accumulation (a summation-order difference), and the
model runs in the dtype asked (float32 by default: the quantization error
alone, without bfloat16's); attention backends that also cast the query to FP8
are not modelled.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from calib import qmath
from calib.errors import CalibInputError
from calib.checkpoint import NameMap
from calib.load import TensorDict, dequantize_state_dict, load_weights, read_checkpoint
from calib.quantize import FUSED_SIBLINGS
from calib.recipe import QuantArgs, Recipe

# vLLM's dynamic per-token FP8 scale floor (1 / (448 * 512)): a row of zeros stays finite.
FP8_MIN_DYNAMIC_SCALE = 1.0 / (qmath.FP8_MAX * 512.0)
_EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.\d+\.(?P<proj>\w+)$")
_EXPERT_INPUT_GROUP = {"w1": "w13", "w3": "w13", "gate_proj": "w13", "up_proj": "w13", "w2": "w2",
                       "down_proj": "w2"}


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: what the server does to one tensor.

def requantize_to_max_scale(weights: list[torch.Tensor], scales: list[torch.Tensor]
                            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """vLLM's ``requantize_with_max_scale`` for FP8 per-tensor shards of one fused layer:
    ``w_i = (q_i as float16) * s_i`` (computed in float16), then
    ``q_i' = fp8(clamp(w_i / max(s), -448, 448))``. Returns the new FP8 shards and ``max(s)``."""
    scales32 = [s.to(torch.float32).reshape(()) for s in scales]
    largest = torch.stack(scales32).max()
    out = []
    for q, s in zip(weights, scales32):
        dequantized = q.to(torch.float16) * s  # float16 tensor * 0-dim float32: computed and kept in float16
        out.append(qmath.quantize_fp8(dequantized, largest))
    return out, largest.reshape(1)


def fake_quantize_activation(x: torch.Tensor, args: QuantArgs, scale: torch.Tensor | None = None,
                             zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` quantized and dequantized as the server's activation quantizer does it.

    Static (``scale`` given): FP8 ``fp8(clamp(x / s))``; INT8 ``clamp(round(x / s) + zp, -128, 127)``.
    Dynamic: the scale is computed from ``x`` itself, per token (last dim reduced) or per tensor:
    FP8 ``amax / 448`` (floored at 1/(448*512)); INT8 symmetric ``amax / 127``, asymmetric
    ``(max - min) / 255`` with ``zp = round(-128 - min / s)``. Returned in ``x``'s dtype.
    """
    x32 = x.to(torch.float32)
    qmax = qmath.qmax_for(args.num_bits, args.type == "float")
    if scale is None:
        per_token = args.strategy == "token"
        reduce = (lambda t, f: f(t, dim=-1, keepdim=True)) if per_token else (lambda t, f: f(t))
        if args.symmetric:
            scale = reduce(x32.abs(), torch.amax) / qmax
        else:
            lo = reduce(x32, torch.amin).clamp(max=0.0)
            hi = reduce(x32, torch.amax).clamp(min=0.0)
            scale = (hi - lo) / (qmath.INT8_MAX - qmath.INT8_MIN)
            scale = scale.clamp(min=qmath.MIN_SCALE)
            zero_point = torch.round(qmath.INT8_MIN - lo / scale)
        scale = scale.clamp(min=FP8_MIN_DYNAMIC_SCALE if args.type == "float" else qmath.MIN_SCALE)
    scale = scale.to(torch.float32)
    if args.type == "float":
        return qmath.quantize_fp8(x32, scale).to(torch.float32).mul_(scale).to(x.dtype)
    lo, hi = -(2 ** (args.num_bits - 1)), 2 ** (args.num_bits - 1) - 1
    q = torch.round(x32 / scale)
    if zero_point is not None:
        zp = zero_point.to(torch.float32)
        return q.add_(zp).clamp_(lo, hi).sub_(zp).mul_(scale).to(x.dtype)
    return q.clamp_(lo, hi).mul_(scale).to(x.dtype)


def fake_quantize_kv(states: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """An FP8 KV-cache entry as attention reads it back: ``fp8(clamp(x / s)) * s`` (saturating cast)."""
    s = scale.to(torch.float32)
    return qmath.quantize_fp8(states, s).to(torch.float32).mul_(s).to(states.dtype)


def fused_groups(prefixes: list[str]) -> list[list[str]]:
    """Quantized modules (checkpoint names) that the server fuses into one GEMM, siblings in order."""
    present = set(prefixes)
    groups = []
    for prefix in prefixes:
        parent, _, leaf = prefix.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if leaf == siblings[0]:
                names = [f"{parent}.{s}" if parent else s for s in siblings]
                found = [n for n in names if n in present]
                if len(found) > 1:
                    groups.append(found)
    return groups


# ---------------------------------------------------------------------------------------------------------------
# The served model.

@dataclass
class ServedModel:
    """A float model whose forward computes what the server computes for the checkpoint."""

    model: nn.Module
    recipe: Recipe
    notes: list[str] = field(default_factory=list)
    kv_scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer_idx -> (k, v)
    quantized_modules: int = 0
    handles: list = field(default_factory=list, repr=False)

    def new_cache(self):
        """A KV cache for one forward that stores K and V as the server's FP8 cache does; ``None``
        when the checkpoint has no KV-cache scheme (then no cache is needed)."""
        if not self.kv_scales:
            return None
        cls = _quantizing_cache_class()
        cache = cls(config=self.model.config)
        cache.calib_kv_scales = self.kv_scales
        return cache

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _quantizing_cache_class():
    from transformers import DynamicCache

    class QuantizingCache(DynamicCache):
        calib_kv_scales: dict[int, tuple[torch.Tensor, torch.Tensor]]

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            scales = self.calib_kv_scales.get(layer_idx)
            if scales is None:
                raise CalibInputError(f"attention layer {layer_idx} has no k_scale/v_scale in the checkpoint")
            key_states = fake_quantize_kv(key_states, scales[0])
            value_states = fake_quantize_kv(value_states, scales[1])
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return QuantizingCache


def load_served(path: str | Path, dtype: torch.dtype = torch.float32) -> ServedModel:
    """The checkpoint at ``path`` as vLLM computes it (see the module docstring), in ``dtype``."""
    model, recipe, tensors = read_checkpoint(path)
    notes: list[str] = []
    quantized = [k[: -len(".weight_scale")] for k in tensors if k.endswith(".weight_scale")]
    weights = recipe.weights
    activations = recipe.input_activations
    groups = fused_groups(quantized)
    if weights.is_fp8 and weights.strategy == "tensor" and groups:
        differing = 0
        for group in groups:
            scales = [tensors[f"{n}.weight_scale"] for n in group]
            differing += any(not torch.equal(scales[0], s) for s in scales[1:])
            new, largest = requantize_to_max_scale([tensors[f"{n}.weight"] for n in group], scales)
            for name, q in zip(group, new):
                tensors[f"{name}.weight"] = q
                tensors[f"{name}.weight_scale"] = largest.to(tensors[f"{name}.weight_scale"].dtype)
        notes.append(f"{len(groups)} fused layers: FP8 per-tensor shards re-quantized to the largest shard scale "
                     f"({differing} with differing shard scales, rounded twice)" if differing else
                     f"{len(groups)} fused layers: one FP8 weight scale per fused layer, as stored (nothing to "
                     "re-quantize)")
    input_scales = {n: tensors[f"{n}.input_scale"].to(torch.float32) for n in quantized
                    if f"{n}.input_scale" in tensors}
    zero_points = {n: tensors[f"{n}.input_zero_point"] for n in quantized if f"{n}.input_zero_point" in tensors}
    if activations is not None and not activations.dynamic:
        _share_input_scales(input_scales, zero_points, groups, activations, notes)
        missing = [n for n in quantized if n not in input_scales]
        if missing:
            raise CalibInputError(f"static activations but no input_scale for {missing[:5]} "
                                  f"({len(missing)} modules) in {path}")
    state = dequantize_state_dict(tensors, dtype=torch.float32)
    name_map = NameMap.for_model(model, TensorDict(state))
    module_of = {n: (name_map.module_of(f"{n}.weight") or f"{n}.weight")[: -len(".weight")] for n in quantized}
    load_weights(model, state, dtype)
    served = ServedModel(model=model, recipe=recipe, notes=notes, quantized_modules=len(quantized))
    if activations is not None:
        modules = dict(model.named_modules())
        for name in quantized:
            module = modules.get(module_of[name])
            if module is None:
                raise CalibInputError(f"{name} has a weight_scale but the model has no module {module_of[name]}")
            served.handles.append(module.register_forward_pre_hook(
                _activation_hook(activations, input_scales.get(name), zero_points.get(name))))
    if recipe.kv_cache is not None:
        served.kv_scales = _kv_scales(model, tensors, name_map, path)
        notes.append(f"KV cache: FP8 with k_scale/v_scale in {len(served.kv_scales)} attention layers")
    return served


def _share_input_scales(scales: dict[str, torch.Tensor], zero_points: dict[str, torch.Tensor],
                        groups: list[list[str]], activations: QuantArgs, notes: list[str]) -> None:
    """One static input scale per fused layer (and per MoE layer and projection kind), as vLLM keeps."""
    shared = [g for g in groups if all(n in scales for n in g)]
    experts: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in scales:
        match = _EXPERT.match(name)
        if match and match["proj"] in _EXPERT_INPUT_GROUP:
            experts[(match["layer"], _EXPERT_INPUT_GROUP[match["proj"]])].append(name)
    moe_groups = [names for names in experts.values() if len(names) > 1]
    disagree = []
    for group in shared + moe_groups:
        values = torch.stack([scales[n].reshape(()) for n in group])
        if activations.type == "int" and group in shared and not torch.equal(values, values[0].expand_as(values)):
            disagree.append(group[0].rpartition(".")[0])
        for name in group:
            scales[name] = values.max().reshape(1)
        if any(n in zero_points for n in group):
            zps = {int(zero_points[n].reshape(())) for n in group if n in zero_points}
            if len(zps) > 1:
                disagree.append(group[0].rpartition(".")[0] + " (zero points)")
    if shared:
        notes.append(f"{len(shared)} fused layers: one static input scale each (the largest of the shards')")
    if moe_groups:
        notes.append(f"{len(moe_groups)} MoE projections: one static input scale over all experts (the largest)")
    if disagree:
        notes.append(f"{len(disagree)} fused INT8 layers have shards with different input scales or zero points "
                     f"(vLLM keeps one; emulated with the largest), e.g. {disagree[0]}")


def _activation_hook(args: QuantArgs, scale: torch.Tensor | None, zero_point: torch.Tensor | None):
    def hook(module: nn.Module, inputs: tuple):
        x = inputs[0]
        return (fake_quantize_activation(x, args, scale, zero_point), *inputs[1:])

    return hook


def _kv_scales(model: nn.Module, tensors: dict[str, torch.Tensor], name_map, path
               ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    from calib.hooks import attention_modules

    found = {}
    for layer_idx, attn in attention_modules(model).items():
        prefix = name_map.checkpoint_prefix(attn)
        keys = (f"{prefix}.k_scale", f"{prefix}.v_scale")
        absent = [k for k in keys if k not in tensors]
        if absent:
            raise CalibInputError(f"the checkpoint has a kv_cache_scheme but no {absent[0]} in {path}")
        found[layer_idx] = tuple(tensors[k].to(torch.float32).reshape(()) for k in keys)
    if not found:
        raise CalibInputError(f"the checkpoint has a kv_cache_scheme but calib finds no attention layer in {path}")
    return found
