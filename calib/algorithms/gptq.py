"""GPTQ: error-compensating rounding of a Linear's weight (Frantar et al., 2022).

Round-to-nearest rounds every weight on its own. GPTQ rounds the input columns
one at a time and spreads each column's rounding error over the columns not yet
rounded, weighted by the inverse Hessian of the layer's reconstruction loss
``|| X W^T - X Q^T ||^2`` (``H = X^T X`` over the calibration tokens), so the
layer's *output* error on the calibration data is what gets minimised.

calib's choices:

* **Scales fixed first.** The scales (per tensor, channel or group, with the
  recipe's weight observer: min-max or the MSE clip) are computed from the
  weight before any column is rounded, and GPTQ rounds onto that grid. The
  checkpoint's scales are therefore the round-to-nearest ones, the format does
  not change, and activation ordering needs no ``g_idx`` (compressed-tensors'
  ``actorder: weight``): every reader loads it.
* **Activation ordering** (``actorder``): columns are rounded in decreasing
  ``diag(H)`` order, the inputs with the most energy first.
* **Dampening** ``dampening_frac * mean(diag(H))`` is added to the diagonal; a
  Hessian that is still not positive definite gets ten times more, up to
  :data:`MAX_ESCALATIONS` times, then a clear error naming the layer.
* Inputs that never saw a non-zero value (``H[j, j] == 0``) are rounded to
  nearest: their error costs nothing on the calibration data and is not spread.
* Fused siblings (q/k/v, gate/up) read the same input and share one Hessian:
  their rows are solved together (GPTQ's rows are independent given ``H``).

Pure functions on tensors; :func:`solve` is what the layer-by-layer executor calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calib import qmath
from calib.errors import CalibInputError
from calib.observers import NonFiniteInput, _valid, nonfinite_kind

MAX_ESCALATIONS = 4  # dampening x10 each time: up to 10^4 x the recipe's
GRAM_BLOCK = 256  # the narrowest column block :func:`gram` splits an input into


def gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` for ``x`` [tokens, n]: the products on and above the diagonal only,
    in ``k`` column blocks (``k = n // GRAM_BLOCK``, at most 8), the blocks below it
    their transposes. That is ``(k + 1) / 2k`` of a full product's multiply-adds
    (5/8 for SmolLM2's 1536-wide ``down_proj`` input), BLAS having no ``syrk``
    in torch; each entry is still one dot product over the tokens."""
    n = x.shape[1]
    k = max(1, min(8, n // GRAM_BLOCK))
    if k == 1:
        return x.T @ x
    bounds = [round(i * n / k) for i in range(k + 1)]
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        row = x[:, lo:hi].T @ x[:, lo:]  # [hi - lo, n - lo]: the diagonal block and those right of it
        out[lo:hi, lo:] = row
        out[hi:, lo:hi] = row[:, hi - lo:].T
    return out


class HessianObserver:
    """``sum x x^T`` over the real tokens a Linear reads, in float64 (an input
    observer: :func:`calib.hooks.observe` feeds it like the range observers)."""

    name = "hessian"

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        rows = _valid(x, mask)
        if rows.numel() == 0:
            return
        rows = rows.to(torch.float32)
        part = gram(rows)  # float32 per batch, summed in float64: the sum of a few such batches is exact
        if self.h is None:  # in practice, so ranks that split the batches add up to the same bytes
            self.h = part.to(torch.float64)
        else:
            self.h += part
        del part
        # |H_ij| <= sqrt(H_ii H_jj): a finite diagonal is a finite Hessian (and costs a row, not a matrix)
        if not torch.isfinite(torch.diagonal(self.h)).all():
            raise NonFiniteInput(nonfinite_kind(rows))
        self.count += rows.shape[0]

    @property
    def observed(self) -> bool:
        return self.h is not None


@dataclass(frozen=True)
class Solved:
    """One weight as GPTQ rounded it: the stored values and scale (the checkpoint's
    tensors, before packing), the dampening that made the Hessian invertible, and
    the relative output error on the calibration inputs, GPTQ vs round-to-nearest."""

    q: torch.Tensor  # int8 or float8_e4m3fn, the weight's shape, CPU
    scale: torch.Tensor  # as stored
    dampening: float
    output_error: float  # || X (Q - W)^T || / || X W^T ||, GPTQ
    output_error_rtn: float  # the same for round-to-nearest
    escalated: bool = False  # the recipe's dampening was not enough


def _round(w: torch.Tensor, s: torch.Tensor, is_fp8: bool, qmax: float) -> torch.Tensor:
    """The stored values of ``w`` on scales ``s`` (qmath.quantize_fp8 / quantize_int, elementwise)."""
    if is_fp8:
        return (w / s).clamp_(-qmath.FP8_MAX, qmath.FP8_MAX).to(qmath.FP8_DTYPE)
    return torch.round(w / s).clamp_(-qmax - 1, qmax).to(torch.int8)


def _to_grid(v: torch.Tensor, is_fp8: bool, qmax: float) -> torch.Tensor:
    """``v`` (already divided by its scale) onto the stored grid, in place, in
    float32: the values the cast to the stored dtype gives (GPTQ's column loop)."""
    if is_fp8:
        return v.copy_(v.clamp_(-qmath.FP8_MAX, qmath.FP8_MAX).to(qmath.FP8_DTYPE))
    return v.round_().clamp_(-qmax - 1, qmax)


def inverse_hessian_factor(h: torch.Tensor, dampening_frac: float, name: str) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of ``(H + damp I)^-1`` (float32) and the
    dampening fraction used: escalated x10 while ``H`` is not positive definite.
    Factorised in float64 (conditioning first): one Cholesky of the reversed
    matrix and one triangular inverse, no explicit inverse."""
    if not torch.isfinite(h).all():
        raise CalibInputError(f"{name}: the GPTQ Hessian holds NaN/Inf: the layer's calibration inputs overflowed "
                              "(load the model in float32: --dtype float32)")
    mean_diag = float(torch.diagonal(h).to(torch.float64).mean())
    if mean_diag <= 0:
        raise CalibInputError(f"{name}: its calibration inputs are all zero, so GPTQ has nothing to minimise; "
                              "ignore the module or remove gptq from the recipe")
    frac = dampening_frac
    m = h.to(torch.float64)
    eye = torch.eye(m.shape[0], dtype=torch.float64, device=m.device)
    for _ in range(MAX_ESCALATIONS + 1):
        # With J the reversal, J H J = M M^T gives H^-1 = (J M^-T J)(J M^-1 J), and J M^-1 J is upper
        # triangular with a positive diagonal: the factor itself (one Cholesky, one triangular inverse).
        lower, info = torch.linalg.cholesky_ex((m + frac * mean_diag * eye).flip(0, 1))
        if int(info) == 0:
            upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
            if torch.isfinite(upper).all():
                return upper.to(torch.float32), frac
        frac *= 10
    raise CalibInputError(f"{name}: the GPTQ Hessian is singular even with dampening {frac / 10:g} x its mean "
                          f"diagonal ({h.shape[0]} inputs, rank {int(torch.linalg.matrix_rank(h))}): use more "
                          "calibration tokens, a larger gptq.dampening_frac, or ignore the module")


def gptq_round(w: torch.Tensor, h: torch.Tensor, scale_full: torch.Tensor, is_fp8: bool, qmax: float, *,
               block_size: int = 128, dampening_frac: float = 0.01, actorder: bool = True,
               name: str = "weight") -> tuple[torch.Tensor, float]:
    """GPTQ-rounded stored values of ``w`` [out, in] on the fixed scales
    ``scale_full`` (float32, ``w``'s shape), with Hessian ``h`` [in, in];
    returns (values, dampening fraction used).

    Works on the transposed weight, so that each input column is a contiguous
    row, and on the stored grid in float32 (one cast at the end)."""
    h = h.to(torch.float32).clone()
    dead = torch.diagonal(h) == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
    wt = w.to(torch.float32).T.contiguous()  # [in, out]
    st = scale_full.to(torch.float32).T.contiguous()
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if actorder else None
    if order is not None:
        wt, st, h, dead = wt[order], st[order], h[order][:, order], dead[order]
    upper, damp = inverse_hessian_factor(h, dampening_frac, name)
    cols = wt.shape[0]
    grid = torch.empty_like(wt)  # the stored values, in float32
    diagonal, dead_at = torch.diagonal(upper).tolist(), dead.tolist()  # Python numbers: no sync per column
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = wt[start:end]  # a view: updated in place
        errors = torch.empty_like(block)
        u = upper[start:end, start:end]
        for i in range(end - start):
            col, sc, stored, error = block[i], st[start + i], grid[start + i], errors[i]
            _to_grid(torch.div(col, sc, out=stored), is_fp8, qmax)
            torch.mul(stored, sc, out=error)
            torch.sub(col, error, out=error).div_(diagonal[start + i])
            if dead_at[start + i]:
                error.zero_()
            if i + 1 < end - start:
                block[i + 1:].addmm_(u[i, i + 1:, None], error[None, :], alpha=-1.0)  # addr_ is unvectorised on CPU
        if end < cols:
            wt[end:].addmm_(upper[start:end, end:].T, errors, alpha=-1.0)
    if order is not None:
        grid = grid[torch.argsort(order)]
    q = grid.T.contiguous()
    return (q.to(qmath.FP8_DTYPE) if is_fp8 else q.to(torch.int8)), damp


def output_error(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor, signal: float | None = None) -> float:
    """``|| X (deq - w)^T || / || X w^T ||`` from ``H = X^T X`` alone (Frobenius
    norms); ``signal``: ``|| X w^T ||^2`` when already known."""
    w, h = w.to(torch.float32), h.to(torch.float32)
    d = deq.to(torch.float32) - w
    if signal is None:
        signal = float(((w @ h) * w).sum(dtype=torch.float64))
    noise = float(((d @ h) * d).sum(dtype=torch.float64))
    return math.sqrt(max(noise, 0.0) / signal) if signal > 0 else 0.0


def _as_float(q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32)


def solve(names: list[str], weights: list[torch.Tensor], scales: list[torch.Tensor], h: torch.Tensor,
          args, *, block_size: int, dampening_frac: float, actorder: bool) -> dict[str, Solved]:
    """GPTQ for modules that read one input (``h``): each weight with its stored
    scale (``scales``, from the recipe's observer), rows solved together."""
    qmax = qmath.qmax_for(args.num_bits, args.is_fp8)
    fulls = [qmath.expand_scale(sc.to(torch.float32), w.shape, args.strategy, args.group_size)
             for w, sc in zip(weights, scales)]
    w_all = torch.cat([w.to(torch.float32).cpu() for w in weights])
    s_all = torch.cat([f.cpu() for f in fulls])
    h = h.cpu().to(torch.float32)
    label = names[0] if len(names) == 1 else f"{names[0]} (with {', '.join(n.rsplit('.', 1)[-1] for n in names[1:])})"
    q_all, damp = gptq_round(w_all, h, s_all, args.is_fp8, qmax, block_size=block_size,
                             dampening_frac=dampening_frac, actorder=actorder, name=label)
    rtn = _round(w_all, s_all, args.is_fp8, qmax)
    solved, row = {}, 0
    for name, w, sc in zip(names, weights, scales):
        n = w.shape[0]
        q, r, s = q_all[row:row + n], rtn[row:row + n], s_all[row:row + n]
        w32 = w_all[row:row + n]
        signal = float(((w32 @ h) * w32).sum(dtype=torch.float64))
        solved[name] = Solved(q=q.contiguous(), scale=sc.cpu(), dampening=damp,
                              output_error=output_error(w32, _as_float(q) * s, h, signal),
                              output_error_rtn=output_error(w32, _as_float(r) * s, h, signal),
                              escalated=damp > dampening_frac)
        row += n
    return solved
