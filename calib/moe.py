"""Mixture-of-experts: every expert as its own Linear projections.

transformers 5 keeps the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3,
OLMoE (and the families that share their code) as one fused module
(``mlp.experts``) with two 3-D parameters, ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``, and converts the per-expert tensors of the checkpoint
(``mlp.experts.3.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.3.w1.weight``)
into them on load. Serving stacks read the per-expert tensors, each with its own
``weight_scale`` and ``input_scale``.

:func:`unfuse_experts` replaces each fused experts module by :class:`LinearExperts`:
a ``ModuleList`` of one small MLP per expert whose ``nn.Linear`` children carry
the checkpoint's names (``w1``/``w3``/``w2`` for Mixtral, ``gate_proj``/``up_proj``/
``down_proj`` elsewhere, read from transformers' own conversion rules). The
weights are views of the fused parameters (no copy); the forward is the eager
one of transformers (route, run each expert on its tokens, weight, add). Then
everything calib does to a dense model applies per expert: one plan entry per
projection, per-expert input observers (each sees exactly the tokens routed to
it), gate/up of one expert fused like q/k/v, and module names that map one to one
onto the checkpoint's.

Calibration extras, active only inside :func:`calib.hooks.observe`:

* the tokens routed to each expert are counted (padding excluded) into the
  observation session (``session.expert_tokens``);
* with ``route_all`` (``--moe-calibrate-all-experts``) every expert also runs on
  every token, for observation only: the layer's output still follows the router.

A fused layout calib does not know (interleaved gate/up stored fused in the
checkpoint, as gpt-oss does, a post-expert norm, no converter naming the
per-expert tensors) is left fused, and :func:`unsupported_weights` reports it
so planning stops with the module's name and class.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

# Last name parts of MoE routers: never quantized by default (serving stacks keep them
# in high precision, and their logits decide which expert runs).
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})


@dataclass(frozen=True)
class ExpertNames:
    """The checkpoint's names of one expert's projections (``experts.<e>.<name>.weight``)."""

    gate: str
    up: str
    down: str


def is_fused_experts(module: nn.Module) -> bool:
    """A fused experts module: 3-D ``gate_up_proj`` and ``down_proj`` parameters."""
    gate_up = module._parameters.get("gate_up_proj")
    down = module._parameters.get("down_proj")
    return gate_up is not None and down is not None and gate_up.dim() == 3 and down.dim() == 3


def fused_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every fused experts module in ``model``."""
    return [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]


def expert_names(model: nn.Module) -> ExpertNames | None:
    """The per-expert projection names transformers' load rules stack into the fused
    parameters (``.experts.*.w1.weight`` + ``.experts.*.w3.weight`` -> ``gate_up_proj``);
    None when the model has no such rule (its checkpoint stores the experts fused)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return None
    try:
        conversions = get_model_conversion_mapping(model)
    except Exception:  # a model class transformers has no mapping for
        return None
    part = re.compile(r"experts\.\*\.([A-Za-z0-9_]+)\.weight$")
    gate_up = down = None
    for conv in conversions:
        if not isinstance(conv, WeightConverter):
            continue
        targets = [t for t in conv.target_patterns if isinstance(t, str)]
        names = [m.group(1) for s in conv.source_patterns if (m := part.search(str(s)))]
        if any(t.endswith("experts.gate_up_proj") for t in targets) and len(names) == 2:
            gate_up = names
        elif any(t.endswith("experts.down_proj") for t in targets) and len(names) == 1:
            down = names[0]
    if gate_up is None or down is None:
        return None
    return ExpertNames(gate=gate_up[0], up=gate_up[1], down=down)


def _layout_problem(module: nn.Module, names: ExpertNames | None) -> str | None:
    """Why a fused experts module cannot be split into Linear projections (None: it can)."""
    if names is None:
        return ("the checkpoint stores these experts fused (transformers has no rule naming per-expert tensors; "
                "gpt-oss: gate_up_proj [E, H, 2I], interleaved, with biases, the only layout vLLM's gpt-oss loader "
                "reads), and calib writes experts per expert")
    if not getattr(module, "has_gate", True):
        return "its experts have no gate projection"
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        return "its gate_up_proj is transposed or interleaved"
    if getattr(module, "has_bias", False) or getattr(module, "has_post_expert_norm", False):
        return "its experts have biases or a post-expert norm"
    gate_up, down = module.gate_up_proj, module.down_proj
    experts, two_i, hidden = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (experts, hidden, two_i // 2):
        return f"gate_up_proj {list(gate_up.shape)} and down_proj {list(down.shape)} do not fit [E, 2I, H] / [E, H, I]"
    if not callable(getattr(module, "_apply_gate", None)):
        return "it has no _apply_gate activation"
    return None


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, with the fused module's own activation."""

    def __init__(self, names: ExpertNames, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
        super().__init__()
        self.names = names
        self.add_module(names.gate, gate)
        self.add_module(names.up, up)
        self.add_module(names.down, down)

    def forward(self, x: torch.Tensor, apply_gate) -> torch.Tensor:
        gate = getattr(self, self.names.gate)(x)
        up = getattr(self, self.names.up)(x)
        return getattr(self, self.names.down)(apply_gate(torch.cat([gate, up], dim=-1)))


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight is ``weight`` (a view: no copy, no init)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


class LinearExperts(nn.ModuleList):
    """A fused experts module as one :class:`ExpertMLP` per expert (children ``0``,
    ``1``, ...), called like it: ``(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``."""

    def __init__(self, fused: nn.Module, names: ExpertNames, name: str) -> None:
        gate_up, down = fused.gate_up_proj, fused.down_proj
        inter = gate_up.shape[1] // 2
        experts = [ExpertMLP(names, _linear(gate_up[e, :inter]), _linear(gate_up[e, inter:]), _linear(down[e]))
                   for e in range(gate_up.shape[0])]
        super().__init__(experts)
        # The fused module, emptied, keeps its activation (_apply_gate, act_fn, config) without its weights.
        fused._parameters.clear()
        object.__setattr__(self, "_fused", fused)
        self.calib_name = name  # the module's name, for the per-expert token counts
        self.route_all = False  # --moe-calibrate-all-experts: every expert sees every token (observation only)
        self.fused_class = type(fused).__name__

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        from calib.hooks import current_session, routed_rows

        session = current_session()
        real = session.token_rows(hidden_states.shape[0]) if session is not None else None
        final = torch.zeros_like(hidden_states)
        apply_gate = self._fused._apply_gate
        counts = [0] * len(self) if session is not None else None
        for e, expert in enumerate(self):
            # rows ordered by top-k position, then token, as transformers' fused loop orders them: a GEMM's
            # rounding can depend on where a row sits (the tail rows of a block), so this keeps it exact
            position, token_idx = torch.where((top_k_index == e).T)
            if counts is not None:
                counts[e] = int(real[token_idx].sum()) if real is not None else int(token_idx.numel())
            if self.route_all and session is not None:
                with routed_rows(real):
                    every = expert(hidden_states, apply_gate)
                out = every[token_idx]
            elif token_idx.numel():
                with routed_rows(real[token_idx] if real is not None else None):
                    out = expert(hidden_states[token_idx], apply_gate)
            else:
                continue
            out = out * top_k_weights[token_idx, position, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        if counts is not None:
            session.count_expert_tokens(self.calib_name, counts)
        return final

    def extra_repr(self) -> str:
        return f"unfused {self.fused_class}, {len(self)} experts"


def unfuse_experts(model: nn.Module) -> list[str]:
    """Replace every fused experts module calib can split by :class:`LinearExperts`
    (in place; the weights become views, nothing is copied). Returns the names
    replaced. Modules it cannot split stay as they are (see :func:`unsupported_weights`).
    Works on a loaded model and on a ``meta`` skeleton alike; idempotent."""
    fused = fused_experts_modules(model)
    if not fused:
        return []
    names = expert_names(model)
    done = []
    for name, module in fused:
        if _layout_problem(module, names) is not None:
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, LinearExperts(module, names, name))
        done.append(name)
    if done:
        log.debug("split %d fused experts modules into per-expert Linear projections (%s ...)", len(done), done[0])
    return done


def set_route_all(model: nn.Module, enabled: bool) -> int:
    """Turn ``--moe-calibrate-all-experts`` on or off; returns the experts modules it applies to."""
    modules = [m for m in model.modules() if isinstance(m, LinearExperts)]
    for module in modules:
        module.route_all = enabled
    return len(modules)


def is_router(model: nn.Module, name: str) -> bool:
    """A router or gate of an MoE block (``mlp.gate``, ``shared_expert_gate``, ``mlp.router``):
    its last name part is one of :data:`ROUTER_NAMES` and its parent holds experts."""
    parent_name, _, leaf = name.rpartition(".")
    if leaf not in ROUTER_NAMES:
        return False
    weight = model.get_submodule(name)._parameters.get("weight")
    if weight is None or weight.dim() != 2:
        return False
    parent = model.get_submodule(parent_name) if parent_name else model
    return any(child in parent._modules for child in ("experts", "shared_expert", "shared_experts"))


def unsupported_weights(model: nn.Module) -> list[tuple[str, str, str]]:
    """``(module, class, why)`` for each projection-like module a ``Linear`` recipe
    cannot quantize: fused experts calib could not split, GPT-2's ``Conv1D``
    (weights stored transposed), and any other module with a 3-D floating-point
    parameter that is not a convolution."""
    names = None
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, LinearExperts, nn.Embedding)) or not name:
            continue
        cls = type(module).__name__
        if cls == "Conv1D":
            out.append((name, cls, "GPT-2-style Conv1D stores its weight transposed ([in, out]), and transformers + "
                        "compressed-tensors quantize only nn.Linear: they would read a quantized Conv1D as raw "
                        "8-bit values"))
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if is_fused_experts(module):
            names = names if names is not None else expert_names(model)
            out.append((name, cls, _layout_problem(module, names) or "fused experts"))
            continue
        own = [p for p in module._parameters.values() if p is not None and p.dim() >= 3 and p.is_floating_point()]
        if own:
            out.append((name, cls, f"it holds {len(own)} parameter(s) of 3 or more dimensions calib has no layout for"))
    return out


# An expert that the router sent fewer than this fraction of its fair share of the
# calibration tokens (routed tokens / experts in its layer) is named in the summary:
# its input scale rests on little data (--moe-calibrate-all-experts fixes that).
FEW_TOKENS_FRACTION = 0.1
SHOWN_EXPERTS = 8


def moe_report(expert_tokens: dict[str, list[int]], all_experts: bool, unobserved: list[str]) -> dict | None:
    """The report's ``moe`` section: tokens the router sent to each expert, the
    experts below :data:`FEW_TOKENS_FRACTION` of their layer's fair share, and how
    experts that saw no token got their input scale. None for a dense model."""
    if not expert_tokens:
        return None
    few, empty, experts = [], [], 0
    for name, counts in expert_tokens.items():
        experts += len(counts)
        share = sum(counts) / max(len(counts), 1)
        threshold = max(1, int(FEW_TOKENS_FRACTION * share))
        few += [f"{name}.{e} ({n})" for e, n in enumerate(counts) if n < threshold]
        empty += [f"{name}.{e}" for e, n in enumerate(counts) if n == 0]
    if all_experts:
        handling = "every expert observed every calibration token (--moe-calibrate-all-experts)"
    else:
        handling = ("tokens routed by the model's router only; an expert that received none takes the largest "
                    "input range of the same projection in the other experts of its layer (listed in "
                    "unobserved_modules)")
    return {
        "experts_modules": len(expert_tokens),
        "experts": experts,
        "calibrate_all_experts": all_experts,
        "scales_from": handling,
        "few_tokens_fraction": FEW_TOKENS_FRACTION,
        "experts_with_few_tokens": few,
        "experts_without_tokens": empty,
        "unobserved_modules": list(unobserved),
        "tokens_per_expert": {name: list(counts) for name, counts in expert_tokens.items()},
    }


def moe_summary(section: dict | None) -> str | None:
    """One summary line for the CLI (None for a dense model)."""
    if not section:
        return None
    counts = [n for c in section["tokens_per_expert"].values() for n in c]
    text = (f"{section['experts']} experts in {section['experts_modules']} layers, routed tokens per expert "
            f"min {min(counts)} / max {max(counts)}")
    if section["calibrate_all_experts"]:
        return text + "; every expert observed every token (--moe-calibrate-all-experts)"
    few = section["experts_with_few_tokens"]
    if not few:
        return text
    shown = ", ".join(few[:SHOWN_EXPERTS]) + (f" and {len(few) - SHOWN_EXPERTS} more" if len(few) > SHOWN_EXPERTS
                                              else "")
    fallback = (f"; {len(section['experts_without_tokens'])} got none and use their siblings' input range"
                if section["experts_without_tokens"] else "")
    return (f"{text}; {len(few)} below {section['few_tokens_fraction']:.0%} of their share: {shown}{fallback}. "
            "Use --moe-calibrate-all-experts or more calibration data")
