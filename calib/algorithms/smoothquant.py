"""SmoothQuant: move activation outliers into the weights, exactly.

For a Linear ``y = W x`` whose input ``x`` comes from a module we can rescale
per channel (an RMSNorm's weight, or the rows of the previous projection), pick
``s_j = max|x_j|^alpha / max|W_{:,j}|^(1 - alpha)``, divide the producer's
channel ``j`` by ``s_j`` and multiply ``W``'s column ``j`` by ``s_j``. In exact
arithmetic the model computes the same function; the input ``x / s`` has a
flatter range, which is what per-tensor INT8 activations need.

Pairs (Llama, Mistral, Qwen2 and other Llama-family decoders):
``input_layernorm -> q/k/v_proj``, ``post_attention_layernorm -> gate/up_proj``,
``up_proj -> down_proj`` (down reads ``act(gate) * up``, linear in up's rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

MIN_SCALE = 1e-5


@dataclass
class SmoothPair:
    producer: str  # module whose output channels are divided by s
    consumers: list[str]  # Linears whose input columns are multiplied by s


def smoothing_pairs(model: nn.Module, targets: dict[str, nn.Linear]) -> list[SmoothPair]:
    """The (producer, consumers) pairs present among the quantized Linears."""
    modules = dict(model.named_modules())
    pairs = []
    for name, module in modules.items():
        kind = type(module).__name__
        parent = name.rpartition(".")[0]
        if name.endswith("input_layernorm") and kind.endswith("RMSNorm") and "Gemma" not in kind:
            consumers = [f"{parent}.self_attn.{p}_proj" for p in "qkv"]
        elif name.endswith("post_attention_layernorm") and kind.endswith("RMSNorm") and "Gemma" not in kind:
            consumers = [f"{parent}.mlp.{p}_proj" for p in ("gate", "up")]
        elif name.endswith("mlp.up_proj") and isinstance(module, nn.Linear):
            consumers = [f"{parent}.down_proj"]
        else:
            continue
        if all(c in targets for c in consumers):
            pairs.append(SmoothPair(producer=name, consumers=consumers))
    return pairs


def smoothing_scales(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s = amax_x^alpha / amax_w^(1 - alpha)`` per input channel; 1 where a channel saw nothing."""
    w_amax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    x = act_amax.float()
    s = x.clamp(min=MIN_SCALE).pow(alpha) / w_amax.clamp(min=MIN_SCALE).pow(1.0 - alpha)
    s = torch.where((x > 0) & (w_amax > 0), s, torch.ones_like(s))
    return s.clamp(min=MIN_SCALE)


@torch.no_grad()
def apply_smoothing(model: nn.Module, pair: SmoothPair, scales: torch.Tensor) -> None:
    """Divide the producer's output channels by ``scales``, multiply the consumers' inputs by them."""
    producer = model.get_submodule(pair.producer)
    s = scales.to(producer.weight.device)
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for name in pair.consumers:
        linear = model.get_submodule(name)
        linear.weight.mul_(s.to(linear.weight.dtype).unsqueeze(0))
