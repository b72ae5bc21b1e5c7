"""SmoothQuant: move activation outliers into the weights, exactly.

For a Linear ``y = W x`` whose input ``x`` comes from a module we can rescale
per channel (an RMSNorm's weight, or the rows of the previous projection), pick
``s_j = max|x_j|^alpha / max|W_{:,j}|^(1 - alpha)``, divide the producer's
channel ``j`` by ``s_j`` and multiply ``W``'s column ``j`` by ``s_j``. In exact
arithmetic the model computes the same function; the input ``x / s`` has a
flatter range, which is what per-tensor INT8 activations need.

Pairs come from per-layer mappings (producer -> consumers, names relative to a
decoder layer), the defaults covering the architecture matrix, or the recipe's
``smoothquant.mappings``:

* Llama, Mistral, Qwen2/3: ``input_layernorm -> self_attn.q/k/v_proj``,
  ``post_attention_layernorm -> mlp.gate/up_proj``, ``mlp.up_proj -> mlp.down_proj``
  (down reads ``act(gate) * up``, linear in up's rows), ``self_attn.v_proj ->
  self_attn.o_proj`` (attention mixes the value rows per channel, linearly).
  Under grouped-query attention each value channel feeds one channel of every
  query head of its group: those ``o_proj`` columns share one scale
  (:attr:`SmoothPair.source`).
* Phi-3: the fused ``self_attn.qkv_proj`` and ``mlp.gate_up_proj`` as consumers
  of the norms, and as producers through the rows their consumers read: the
  value rows of ``qkv_proj`` -> ``o_proj``, the up half of ``gate_up_proj`` (down
  reads ``up * act(gate)``) -> ``down_proj``.
* Gemma: its RMSNorm multiplies by ``1 + w``, so the norm's weight becomes
  ``(1 + w) / s - 1``; Gemma 2/3 feed the MLP from ``pre_feedforward_layernorm``
  (their ``post_attention_layernorm`` normalises the attention output on its way
  to the residual: never a producer there).
* OPT: ``self_attn_layer_norm -> q/k/v``, ``final_layer_norm -> fc1``, and
  ``fc1 -> fc2`` when the activation between is ReLU (``relu(x / s) = relu(x) / s``).
* GPT-NeoX: ``input_layernorm -> attention.query_key_value``,
  ``post_attention_layernorm -> mlp.dense_h_to_4h`` (GELU: no fc pair), and the
  value rows of ``query_key_value`` (interleaved per head) -> ``attention.dense``.
  OPT: ``self_attn.v_proj -> self_attn.out_proj`` too.
* Mixture-of-experts layers: each routed expert's up -> down (under the
  checkpoint's names, Mixtral's ``w3 -> w2``) and the shared experts' (an expert
  no calibration token reached is left as it is); the norm before the experts is
  no producer (the router reads it too, and stays in float).
* BERT: ``attention.self.value -> attention.output.dense``. Its post-LayerNorms
  are no producers: ``attention.output.LayerNorm``'s output is also the residual,
  so rescaling it for ``intermediate.dense`` changes the model (llm-compressor does
  it); a recipe mapping that asks for it is refused by the check below.

Every rewrite is checked before anything is quantized (:func:`check_preserved`):
a calibration batch goes through each layer before and after, and a layer whose
output moves beyond float rounding stops the run, naming its mappings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from calib import qmath

log = logging.getLogger(__name__)

MIN_SCALE = 1e-5


@dataclass
class SmoothPair:
    producer: str  # module whose output channels are divided by s
    consumers: list[str]  # Linears whose input columns are multiplied by s
    offset: float = 0.0  # the producer's weight acts as (offset + w): Gemma's RMSNorm has 1
    # For each consumer input channel, the producer output channel it reads; None: the same
    # channel. Consumer channels reading one producer channel (a value channel under
    # grouped-query attention) get one scale; producer rows no consumer reads keep theirs.
    source: torch.Tensor | None = None
    producer_channels: int = 0  # the producer's output channels (with ``source``)

    def producer_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """The divisors of the producer's output channels for the consumers'
        (tied) ``scales``: 1 on the rows no consumer reads, so those stay bit for bit."""
        if self.source is None:
            return scales
        out = torch.ones(self.producer_channels, dtype=scales.dtype, device=scales.device)
        out[self.source.to(scales.device)] = scales
        return out


# (producer, consumers), relative to a decoder layer; the first mapping whose modules
# all exist claims its consumers (Phi-3's fused names, Gemma 2/3's pre-feedforward norm).
DEFAULT_MAPPINGS: list[tuple[str, list[str]]] = [
    ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("input_layernorm", ["self_attn.qkv_proj"]),
    ("input_layernorm", ["attention.query_key_value"]),
    ("pre_feedforward_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
    ("post_attention_layernorm", ["mlp.gate_up_proj"]),
    ("post_attention_layernorm", ["mlp.dense_h_to_4h"]),
    ("mlp.up_proj", ["mlp.down_proj"]),
    ("mlp.shared_expert.up_proj", ["mlp.shared_expert.down_proj"]),  # Qwen2-MoE
    ("mlp.shared_experts.up_proj", ["mlp.shared_experts.down_proj"]),  # DeepSeek-V3
    ("mlp.gate_up_proj", ["mlp.down_proj"]),
    ("self_attn.v_proj", ["self_attn.o_proj"]),
    ("self_attn.qkv_proj", ["self_attn.o_proj"]),
    ("attention.query_key_value", ["attention.dense"]),
    ("self_attn.v_proj", ["self_attn.out_proj"]),
    ("self_attn_layer_norm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
    ("final_layer_norm", ["fc1"]),
    ("fc1", ["fc2"]),
    ("attention.self.value", ["attention.output.dense"]),
]


def _producer_ok(module: nn.Module, layer: nn.Module, producer: str, model: nn.Module) -> bool:
    """Whether ``module`` can be rescaled per output channel exactly: a norm with a
    weight, or a Linear (``fc1`` only when a ReLU follows it)."""
    if isinstance(module, nn.Linear):
        if producer.endswith("fc1"):
            act = getattr(layer, "activation_fn", None)
            name = getattr(getattr(model, "config", None), "activation_function", None)
            return isinstance(act, nn.ReLU) or name == "relu"
        return True
    return "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None


def _attention_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head dim) from the model's (text) config."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "hidden_size", 0) // heads
    return (heads, kv, head_dim) if head_dim and heads % kv == 0 else None


def value_channels(heads: int, kv_heads: int, head_dim: int, base: int = 0, stride: int | None = None) -> torch.Tensor:
    """For each channel ``h * head_dim + d`` of the attention output (query head
    ``h``), the producer row of its value: ``base + (h // (heads / kv_heads)) *
    stride + d`` (``stride``: a value head's step in the producer's rows, ``head_dim``
    by default)."""
    h = torch.arange(heads).repeat_interleave(head_dim)
    d = torch.arange(head_dim).repeat(heads)
    return base + (h // (heads // kv_heads)) * (stride or head_dim) + d


def _source_channels(model: nn.Module, shape: tuple[int, int, int] | None, producer_name: str, producer: nn.Module,
                     consumer: nn.Linear):
    """How the consumer's input channels map onto a Linear producer's output rows:
    ``(None, 0)`` for the same channels, ``(source, rows)`` for a part of a fused
    producer or a grouped-query value, ``None`` when calib does not know the layout.
    ``shape``: :func:`_attention_shape`."""
    rows, width = producer.out_features, consumer.in_features
    leaf = producer_name.rsplit(".", 1)[-1]
    if leaf == "gate_up_proj":  # Phi-3: gate, up = chunk(2); down reads up * act(gate)
        return (torch.arange(width, 2 * width), rows) if rows == 2 * width else None
    if leaf == "qkv_proj":  # Phi-3: [q | k | v] rows
        if shape is None:
            return None
        heads, kv, hd = shape
        if rows != (heads + 2 * kv) * hd or width != heads * hd:
            return None
        return value_channels(heads, kv, hd, base=(heads + kv) * hd), rows
    if leaf == "query_key_value":  # GPT-NeoX: rows per head [q | k | v]
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if shape is None or model_type != "gpt_neox":
            return None
        heads, kv, hd = shape
        if kv != heads or rows != 3 * heads * hd or width != heads * hd:
            return None
        return value_channels(heads, heads, hd, base=2 * hd, stride=3 * hd), rows
    if rows == width:
        return None, 0
    if leaf == "v_proj" and shape is not None:  # grouped-query attention
        heads, kv, hd = shape
        if rows == kv * hd and width == heads * hd:
            return value_channels(heads, kv, hd), rows
    return None


VALUE_PRODUCERS = ("v_proj", "qkv_proj", "query_key_value", "value")  # producers whose rows are the attention's values


def _expert_pairs(layer: nn.Module, base: str, targets: dict[str, nn.Linear], claimed: set[str]) -> list[SmoothPair]:
    """Each routed expert's up -> down (:class:`calib.moe.ExpertMLP`: down reads
    ``act(gate) * up``), under the checkpoint's names (Mixtral: ``w3 -> w2``)."""
    from calib.moe import ExpertMLP

    out = []
    for sub, module in layer.named_modules():
        if isinstance(module, ExpertMLP):
            up, down = f"{base}.{sub}.{module.names.up}", f"{base}.{sub}.{module.names.down}"
            if up in targets and down in targets and down not in claimed:
                out.append(SmoothPair(producer=up, consumers=[down]))
                claimed.add(down)
    return out


def smoothing_pairs(model: nn.Module, targets: dict[str, nn.Linear],
                    mappings: list[tuple[str, list[str]]] | None = None, *,
                    kv_cache: bool = False) -> list[SmoothPair]:
    """The (producer, consumers) pairs present among the quantized Linears, layer
    by layer. ``mappings``: the recipe's (replacing the defaults); one that
    matches in no layer is an error naming it. With ``kv_cache`` (the recipe
    quantizes the KV cache) the values are not rescaled: the cache's ``v_scale``
    would be observed on the values before smoothing in the in-order GPTQ pass;
    a recipe mapping that asks for it is an error."""
    from calib.errors import CalibInputError
    from calib.layers import find_decoder_layers

    try:
        layout = find_decoder_layers(model)
    except Exception:  # not a layered model calib knows: nothing to smooth
        return []
    modules = dict(model.named_modules())
    shape = _attention_shape(model)
    rules = mappings if mappings is not None else DEFAULT_MAPPINGS
    used = [False] * len(rules)
    pairs = []
    for index, layer in enumerate(layout.layers):
        base = layout.layer_name(index)
        claimed: set[str] = set()
        for number, (producer, consumers) in enumerate(rules):
            p = f"{base}.{producer}"
            cs = [f"{base}.{c}" for c in consumers]
            if p not in modules or not all(c in modules for c in cs):
                continue
            used[number] = True
            if any(c in claimed for c in cs):
                continue
            if producer == "post_attention_layernorm" and f"{base}.pre_feedforward_layernorm" in modules:
                continue  # Gemma 2/3: the attention output's norm, on the residual path
            if not all(c in targets for c in cs) or not _producer_ok(modules[p], layer, producer, model):
                continue
            source, rows = None, 0
            if kv_cache and isinstance(modules[p], nn.Linear) and p.rsplit(".", 1)[-1] in VALUE_PRODUCERS:
                if mappings is not None:
                    raise CalibInputError(
                        f"smoothquant.mappings: {producer} -> {', '.join(consumers)} rescales the attention's "
                        "values, and the recipe quantizes the KV cache (kv_cache): calib does not rescale "
                        "values whose cache it quantizes; drop one of the two")
                continue
            if isinstance(modules[p], nn.Linear):
                mapped = _source_channels(model, shape, p, modules[p], modules[cs[0]])
                if mapped is None:
                    if mappings is not None:
                        raise CalibInputError(
                            f"smoothquant.mappings: {producer} -> {', '.join(consumers)}: {p} has "
                            f"{modules[p].out_features} output channels and {cs[0]} reads "
                            f"{modules[cs[0]].in_features}; calib knows how they line up for the same "
                            "channels, Phi-3's gate_up_proj and qkv_proj, GPT-NeoX's query_key_value and a "
                            "grouped-query v_proj, not here")
                    continue
                source, rows = mapped
            offset = 1.0 if "Gemma" in type(modules[p]).__name__ and not isinstance(modules[p], nn.Linear) else 0.0
            pairs.append(SmoothPair(producer=p, consumers=cs, offset=offset, source=source, producer_channels=rows))
            claimed.update(cs)
        if mappings is None:
            pairs.extend(_expert_pairs(layer, base, targets, claimed))
    order = {name: i for i, name in enumerate(modules)}
    pairs.sort(key=lambda pair: order[pair.producer])  # model order: the rescaling order is part of the result
    if mappings is not None:
        missing = [f"{p} -> {', '.join(c)}" for (p, c), ok in zip(rules, used) if not ok]
        if missing:
            raise CalibInputError(f"smoothquant.mappings: {'; '.join(missing)} names modules that no layer of "
                                  f"{type(model).__name__} has (names are relative to a layer, e.g. "
                                  f"{layout.layer_name(0)}.input_layernorm is 'input_layernorm')")
    return pairs


def smoothing_scales(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float,
                     source: torch.Tensor | None = None) -> torch.Tensor:
    """``s = amax_x^alpha / amax_w^(1 - alpha)`` per input channel; 1 where a channel saw nothing.
    With ``source`` (:attr:`SmoothPair.source`), channels reading one producer channel
    share the maxima of the group, hence one scale."""
    return _scales(tie(act_amax.float(), source), tie(_weight_amax(weights), source), alpha)


def tie(values: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
    """``values`` with each channel replaced by the maximum over the channels that
    read the same producer channel (``source``); unchanged without ``source``."""
    if source is None:
        return values
    source = source.to(values.device)
    group = torch.zeros(int(source.max()) + 1, dtype=values.dtype, device=values.device)
    return group.scatter_reduce(0, source, values, "amax", include_self=False)[source]


def _weight_amax(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def _scales(act_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`smoothing_scales` from maxima already tied (:func:`tie`)."""
    x, w_amax = act_amax.float(), w_amax.float()
    s = x.clamp(min=MIN_SCALE).pow(alpha) / w_amax.clamp(min=MIN_SCALE).pow(1.0 - alpha)
    s = torch.where((x > 0) & (w_amax > 0), s, torch.ones_like(s))
    return s.clamp(min=MIN_SCALE)


DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(4, 20))  # alpha: search tries 0.20, 0.25, ..., 0.95
SEARCH_ROWS = 512  # calibration input rows per pair that alpha: search scores on


def fake_quantize_weight(w: torch.Tensor, args) -> torch.Tensor:
    """``w`` [out, in] rounded to nearest on the recipe's weight grid (min-max
    scales per tensor, channel or group; symmetric), back in float32."""
    qmax = qmath.qmax_for(args.num_bits, args.is_fp8)
    w = w.to(torch.float32)
    scale = qmath.expand_scale(qmath.symmetric_scale(qmath.amax_per_strategy(w, args.strategy, args.group_size), qmax),
                               w.shape, args.strategy, args.group_size)
    q = qmath.quantize_fp8(w, scale) if args.is_fp8 else qmath.quantize_int(w, scale, qmin=-int(qmax) - 1,
                                                                              qmax=int(qmax))
    return qmath.dequantize(q, scale)


class _Scorer:
    """:func:`smoothing_error` for many ``scales`` on the same rows and weights:
    the float outputs ``x W^T`` are computed once."""

    def __init__(self, x: torch.Tensor, act_amax: torch.Tensor, weights: list[torch.Tensor], weight_args,
                 input_args) -> None:
        from calib.emulate import fake_quantize_activation  # the served activation quantizer (imports late)

        self.quantize_input = fake_quantize_activation
        self.x = x.to(torch.float32)
        self.act_amax = act_amax.to(torch.float32)
        self.weights = [w.detach().to(torch.float32) for w in weights]
        self.refs = [self.x @ w.T for w in self.weights]
        self.signal = sum(float(r.square().sum(dtype=torch.float64)) for r in self.refs)
        self.weight_args, self.input_args = weight_args, input_args

    def error(self, scales: torch.Tensor) -> float:
        s = scales.to(torch.float32)
        xs = self.x / s
        if self.input_args is not None:  # as the server quantizes them (static: the calibration range of x / s)
            static = None if self.input_args.dynamic else qmath.symmetric_scale(
                (self.act_amax / s).amax(), qmath.qmax_for(self.input_args.num_bits, self.input_args.is_fp8))
            xs = self.quantize_input(xs, self.input_args, static)
        noise = 0.0
        for w, ref in zip(self.weights, self.refs):
            out = torch.addmm(ref, xs, fake_quantize_weight(w * s, self.weight_args).T, alpha=1.0, beta=-1.0)
            noise += float(out.square().sum(dtype=torch.float64))
        return noise / self.signal if self.signal > 0 else 0.0


def smoothing_error(x: torch.Tensor, act_amax: torch.Tensor, weights: list[torch.Tensor], scales: torch.Tensor,
                    weight_args, input_args) -> float:
    """Relative squared output error of the consumers after smoothing by
    ``scales`` and quantizing: ``sum ||Q(x / s) Q(W s)^T - x W^T||^2 / sum ||x W^T||^2``
    over the sampled input rows ``x``; weights rounded to nearest with min-max
    scales, inputs quantized as the server does
    (:func:`calib.emulate.fake_quantize_activation`; not at all when ``input_args``
    is None; a static scale from the calibration range ``act_amax / s``, symmetric)."""
    return _Scorer(x, act_amax, weights, weight_args, input_args).error(scales)


@dataclass
class SmoothChoice:
    """A pair's smoothing: the scales, the alpha they came from, and (searched)
    the relative output error at that alpha and at :data:`REFERENCE_ALPHA`."""

    scales: torch.Tensor
    alpha: float
    error: float | None = None
    error_reference: float | None = None
    scored: int = 0  # searched: how many alphas of the grid were scored


REFERENCE_ALPHA = 0.8  # the report compares a searched alpha's error with this fixed one's


def choose_smoothing(act_amax: torch.Tensor, weights: list[torch.Tensor], alpha: float | str, *,
                     rows: torch.Tensor | None = None, grid: tuple[float, ...] | list[float] = DEFAULT_GRID,
                     weight_args=None, input_args=None, descend: bool = True,
                     source: torch.Tensor | None = None) -> SmoothChoice:
    """The scales for one pair: :func:`smoothing_scales` at ``alpha``, or with
    ``alpha == "search"`` the grid's alpha whose :func:`smoothing_error` on ``rows``
    is smallest: with ``descend``, the local minimum :func:`descend_grid` walks to from
    the grid's alpha nearest :data:`REFERENCE_ALPHA` (~4 alphas scored a pair instead of
    16); otherwise every alpha of the grid is scored (the first on ties). ``source``:
    :func:`smoothing_scales`'s."""
    if alpha != "search":
        return SmoothChoice(smoothing_scales(act_amax, weights, float(alpha), source), float(alpha))
    if rows is None or rows.shape[0] == 0:
        raise ValueError("alpha: search needs sampled calibration rows")
    scorer = _Scorer(rows, act_amax, weights, weight_args, input_args)  # static ranges: the channels' own
    x, w_amax = tie(act_amax.float(), source), tie(_weight_amax(weights), source)  # once, not per alpha
    scores: dict[float, float] = {}

    def score(a: float) -> float:
        if a not in scores:
            scores[a] = scorer.error(_scales(x, w_amax, a))
        return scores[a]

    alphas = sorted(set(grid))
    best = descend_grid(alphas, score) if descend else min(alphas, key=lambda a: (score(a), a))
    reference = score(REFERENCE_ALPHA)
    return SmoothChoice(_scales(x, w_amax, best), best, scores[best], reference,
                        scored=len(set(scores) & set(alphas)))


def descend_grid(alphas: list[float], score) -> float:
    """A local minimum of ``score`` over the sorted ``alphas``: from the one nearest
    :data:`REFERENCE_ALPHA`, step to the lower neighbour (the left one first) while it
    is strictly lower. On an error curve with one minimum (measured on SmolLM2: 89 of
    90 pairs; the 90th a curve of rounding noise around 1e-5) this is the grid's minimum."""
    i = min(range(len(alphas)), key=lambda j: (abs(alphas[j] - REFERENCE_ALPHA), alphas[j]))
    for step in (-1, 1):
        moved = False
        while 0 <= i + step < len(alphas) and score(alphas[i + step]) < score(alphas[i]):
            i, moved = i + step, True
        if moved:
            break
    return alphas[i]


def smooth_pair(model: nn.Module, pair: SmoothPair, observer, recipe) -> SmoothChoice:
    """The smoothing of ``pair`` the recipe asks for, from its consumers'
    :class:`~calib.observers.ChannelMaxObserver` (ranges, and rows to search on,
    which are dropped once used: a layer-by-layer run holds one layer's)."""
    args = recipe.smoothquant
    weights = [model.get_submodule(n).weight for n in pair.consumers]
    rows = observer.sampler.rows if observer.sampler is not None else None
    choice = choose_smoothing(observer.amax, weights, args.alpha, rows=rows, grid=args.grid or DEFAULT_GRID,
                              weight_args=recipe.weights, input_args=recipe.input_activations,
                              descend=args.descends, source=pair.source)
    observer.sampler = None
    return choice


def search_rows(recipe) -> int:
    """Input rows a pair's observer keeps: :data:`SEARCH_ROWS` with ``alpha: search``."""
    return SEARCH_ROWS if recipe.smoothquant is not None and recipe.smoothquant.searched else 0


def summary(choices: dict[str, SmoothChoice]) -> dict:
    """The report's view of the chosen smoothing: per producer, the alpha (and,
    searched, the relative output error at it and at :data:`REFERENCE_ALPHA`)."""
    out = {}
    for producer, c in choices.items():
        entry = {"alpha": c.alpha}
        if c.error is not None:
            entry.update(error=round(c.error, 8), error_at_reference=round(c.error_reference, 8),
                         alphas_scored=c.scored)
        out[producer] = entry
    return out


def describe(choices: dict[str, SmoothChoice]) -> str:
    """One line for the log and the summary: the alphas used (range and median
    when they differ) and, searched, the mean output error against the fixed
    :data:`REFERENCE_ALPHA`'s."""
    alphas = sorted(c.alpha for c in choices.values())
    if not alphas:
        return "no pair"
    text = f"alpha {alphas[0]:.2f}" if alphas[0] == alphas[-1] else \
        f"alpha {alphas[0]:.2f}-{alphas[-1]:.2f}, median {alphas[len(alphas) // 2]:.2f}"
    searched = [c for c in choices.values() if c.error is not None]
    if searched:
        mean = sum(c.error for c in searched) / len(searched)
        reference = sum(c.error_reference for c in searched) / len(searched)
        scored = sum(c.scored for c in searched) / len(searched)
        text += (f", searched per pair ({scored:.1f} alphas scored a pair); mean output error {mean:.3g} "
                 f"(at {REFERENCE_ALPHA}: {reference:.3g})")
    return text


@torch.no_grad()
def apply_smoothing(model: nn.Module, pair: SmoothPair, scales: torch.Tensor) -> None:
    """Divide the producer's output channels by ``scales`` (a weight acting as
    ``offset + w`` becomes ``(offset + w) / s - offset``; through
    :meth:`SmoothPair.producer_scales`), multiply the consumers' inputs by them."""
    producer = model.get_submodule(pair.producer)
    s = pair.producer_scales(scales).to(producer.weight.device)
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
    elif pair.offset:
        producer.weight.add_(pair.offset).div_(s.to(producer.weight.dtype)).sub_(pair.offset)
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for name in pair.consumers:
        linear = model.get_submodule(name)
        linear.weight.mul_(scales.to(linear.weight.device, linear.weight.dtype).unsqueeze(0))


def preservation_tolerance(dtype: torch.dtype) -> float:
    """How far (relative) a layer's output may move under an exact rewrite: float
    rounding, with margin (float32: ~1e-6 an operation; 16-bit: ~4e-3)."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """``||after - before|| / ||before||`` in float64."""
    b, a = before.to(torch.float64), after.to(torch.float64)
    norm = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / norm if norm > 0 else float(torch.linalg.vector_norm(a))


def check_preserved(where: str, pairs: list[SmoothPair], change: float, dtype: torch.dtype) -> None:
    """Stop, naming the mappings, when smoothing moved a layer's output beyond float rounding."""
    from calib.errors import CalibInputError

    tolerance = preservation_tolerance(dtype)
    if change <= tolerance:
        return
    named = "; ".join(f"{p.producer} -> {', '.join(p.consumers)}" for p in pairs)
    raise CalibInputError(
        f"SmoothQuant would change the model: after rescaling {named}, the output of {where} on a calibration "
        f"batch moved by {change:.3g} (relative; an exact rewrite moves it by float rounding, under "
        f"{tolerance:g}). The producer's output also feeds something other than the consumers (a post-LayerNorm "
        "whose output is also the residual, as in BERT): remove smoothquant from the recipe, or give "
        "smoothquant.mappings without this pair. Nothing was written.")
