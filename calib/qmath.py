"""Quantization math: small pure functions, the formula in each docstring.

Conventions (symmetric unless stated):

* FP8 E4M3 (``torch.float8_e4m3fn``, max 448): ``scale = amax / 448``,
  ``q = clamp(x / scale, -448, 448).to(float8_e4m3fn)``, ``x ~ q * scale``.
* INT8: ``scale = amax / 127``, ``q = clamp(round(x / scale), -128, 127)``.
  compressed-tensors divides by 127.5 (``2 amax / 255``) and lets the extreme
  value round to +-128 and clip to 127. We divide by 127: the grid is symmetric,
  the largest magnitude is represented exactly and never clips, and vLLM's own
  dynamic per-token INT8 kernels use 127. ``scripts/bench_int8_divisor.py``
  measures both on real weights (the README gives the numbers).
* Asymmetric INT8: ``scale = (max - min) / 255``, ``zp = round(-128 - min / scale)``,
  ``x ~ (q - zp) * scale``; the range always contains 0 so 0 is exact.

A scale is never 0, NaN or Inf: zero-range tensors and channels get
:data:`MIN_SCALE`; non-finite amax values are rejected before they reach here.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
INT8_MIN, INT8_MAX = -128, 127
# Floor for the scale of an all-zero tensor or channel (storage_scale() lifts it
# to the storage dtype's smallest normal number where that is larger).
MIN_SCALE = float(torch.finfo(torch.float32).eps)


def qmax_for(num_bits: int, is_float: bool) -> float:
    """Largest representable magnitude on the quantized grid."""
    if is_float:
        if num_bits != 8:
            raise ValueError(f"FP{num_bits} is not supported (FP8 E4M3 only)")
        return FP8_MAX
    return float(2 ** (num_bits - 1) - 1)


def symmetric_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``scale = amax / qmax`` in float32, floored at :data:`MIN_SCALE`.

    ``amax`` may be a scalar or any shape (one entry per channel/group).
    """
    amax = amax.detach().to(torch.float32).abs()
    if not torch.isfinite(amax).all():
        raise ValueError("amax contains NaN or Inf: refusing to make a scale from it")
    return torch.clamp(amax / qmax, min=MIN_SCALE)


def asymmetric_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int = INT8_MIN, qmax: int = INT8_MAX
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale = (max - min) / (qmax - qmin)``, ``zp = round(qmin - min / scale)``.

    The range is widened to include 0 so that zero (padding, ReLU outputs) is exact.
    """
    min_val = torch.clamp(min_val.detach().float(), max=0.0)
    max_val = torch.clamp(max_val.detach().float(), min=0.0)
    scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=MIN_SCALE)
    zero_point = torch.clamp(torch.round(qmin - min_val / scale), qmin, qmax).to(torch.int8)
    return scale, zero_point


def storage_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale as it will be stored, in ``dtype``, rounded *up*.

    Rounding to a narrower dtype (bf16 keeps 8 bits of mantissa) can make the
    scale smaller than ``amax / qmax``, and the largest value would then clip.
    Rounding up to the next representable number never clips; weights are
    later quantized with exactly this stored value, so every reader (vLLM
    up-casts to fp32, compressed-tensors computes in the scale's dtype)
    reconstructs the same numbers.
    """
    scale = scale.detach().to(torch.float32)
    if dtype == torch.float32:
        return scale.clone()
    tiny = torch.finfo(dtype).tiny
    stored = torch.clamp(scale, min=tiny).to(dtype)
    too_small = stored.to(torch.float32) < scale
    if too_small.any():
        bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
        bumped = (stored.view(bits) + 1).view(dtype)  # next float up, positive values only
        stored = torch.where(too_small, bumped, stored)
    if not torch.isfinite(stored).all():
        raise ValueError(f"scale overflows {dtype}: max {scale.max().item():.3e}")
    return stored


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(x / scale, -448, 448).to(float8_e4m3fn)``.

    The cast is not saturating (values above 448 become NaN), so clamp first.
    Division is done in float32 whatever the input dtype.
    """
    q = x.to(torch.float32) / scale.to(torch.float32)
    return q.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_int(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    qmin: int = INT8_MIN,
    qmax: int = INT8_MAX,
) -> torch.Tensor:
    """``clamp(round(x / scale) + zp, qmin, qmax)`` as int8 (round half to even)."""
    q = torch.round(x.to(torch.float32) / scale.to(torch.float32))
    if zero_point is not None:
        q = q + zero_point.to(torch.float32)
    return q.clamp_(qmin, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zp) * scale`` computed in float32, returned in ``dtype``."""
    x = q.to(torch.float32)
    if zero_point is not None:
        x = x - zero_point.to(torch.float32)
    return (x * scale.to(torch.float32)).to(dtype)


AMAX_BLOCK_ELEMENTS = 1 << 18  # rows reduced together: |w| of a block stays in the CPU's cache


def amax_per_strategy(w: torch.Tensor, strategy: str, group_size: int | None = None) -> torch.Tensor:
    """``max |w|`` reduced to the scale shape of a weight ``[out, in]``.

    tensor -> ``[1]``; channel -> ``[out, 1]``; group -> ``[out, in / group_size]``.
    On the CPU the rows are reduced a cache-sized block at a time (the maximum is
    exact in any order, so the values are those of the whole-tensor reduction).
    """
    w = w.detach()
    if strategy not in ("tensor", "channel", "group"):
        raise ValueError(f"no weight scales for strategy {strategy!r}")
    if strategy == "group" and (group_size is None or w.shape[-1] % group_size):
        raise ValueError(f"input dim {w.shape[-1]} is not divisible by group_size {group_size}")
    if w.dim() != 2 or w.device.type != "cpu" or w.numel() <= AMAX_BLOCK_ELEMENTS:
        return _amax_rows(w, strategy, group_size)
    step = max(1, AMAX_BLOCK_ELEMENTS // max(w.shape[1], 1))
    parts = [_amax_rows(w[i:i + step], strategy, group_size) for i in range(0, w.shape[0], step)]
    if strategy == "tensor":
        return torch.stack(parts).amax().reshape(1)
    return torch.cat(parts)


def _amax_rows(w: torch.Tensor, strategy: str, group_size: int | None) -> torch.Tensor:
    a = w.abs()
    if strategy == "tensor":
        return a.amax().reshape(1).to(torch.float32)
    if strategy == "channel":
        return a.amax(dim=1, keepdim=True).to(torch.float32)
    out, cols = w.shape
    return a.reshape(out, cols // group_size, group_size).amax(dim=2).to(torch.float32)


def expand_scale(scale: torch.Tensor, shape: torch.Size, strategy: str, group_size: int | None) -> torch.Tensor:
    """Broadcast a weight scale back over ``[out, in]`` (groups repeat along ``in``)."""
    if strategy == "group":
        return scale.repeat_interleave(group_size, dim=1)
    return scale.expand(shape) if strategy == "channel" else scale.reshape(1, 1).expand(shape)


def pack_int32(q: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Pack signed ``num_bits`` integers along the last dim into int32 words.

    compressed-tensors' ``pack-quantized`` layout (what vLLM's WNA16 kernels
    read): values are offset to unsigned (``q + 2^(bits-1)``), and word ``c``
    holds elements ``c*k .. c*k+k-1`` (``k = 32 / bits``), element ``c*k+i`` at
    bits ``[i*bits, (i+1)*bits)``. ``[out, in]`` -> ``[out, in*bits/32]``.
    """
    per_word = 32 // num_bits
    rows, cols = q.shape
    if cols % per_word:
        raise ValueError(f"input dim {cols} is not a multiple of {per_word} ({num_bits}-bit packing)")
    unsigned = (q.to(torch.int64) + 2 ** (num_bits - 1)).reshape(rows, cols // per_word, per_word)
    words = (unsigned << (torch.arange(per_word) * num_bits)).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: signed values as int8, ``[out, cols]``."""
    per_word = 32 // num_bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    fields = (words.unsqueeze(-1) >> (torch.arange(per_word) * num_bits)) & (2**num_bits - 1)
    return (fields.reshape(packed.shape[0], -1)[:, :cols] - 2 ** (num_bits - 1)).to(torch.int8)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal to quantization-noise ratio, ``10 log10(|x|^2 / |x - x~|^2)`` in dB."""
    ref = reference.to(torch.float32)
    noise = (ref - approx.to(torch.float32)).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))
