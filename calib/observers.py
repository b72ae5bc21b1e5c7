"""Observers: running statistics of activations, turned into a clipping range.

Every observer keeps O(1) or O(bins) state, never the activations. ``update``
runs on every calibration batch inside a forward hook, so it is vectorised and
does the cheapest pass that gives its statistic.

``update(x, mask)`` takes the activation (``[..., channels]``) and optionally a
boolean ``mask`` over its leading dimensions (True = a real token); masked-out
positions (padding) never count, whatever they hold. A NaN or Inf at a real
position raises :class:`NonFiniteInput`: a scale made from such a model would
be garbage, and dropping the values would hide a broken model (the hook that
called ``update`` re-raises it naming the module and the batch). The check is
free for min-max: ``lo``/``hi`` are non-finite exactly when the input is.
"""

from __future__ import annotations

import math

import torch

from calib.errors import CalibInputError
from calib.qmath import FP8_MAX
from calib.recipe import BINS_MAX, BINS_MIN

# Candidate clips evaluated at once by the MSE search: bounds its [grid, bins] temporaries (32 MB in float64).
_MSE_CELLS = 1 << 22


class NonFiniteInput(CalibInputError):
    """An observer saw NaN or Inf at a real-token position (``kind``: "NaN" or "Inf")."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"observed {kind} at real (non-padding) token positions")
        self.kind = kind


def nonfinite_kind(*values: torch.Tensor) -> str:
    """``NaN`` if any of the reduced values is NaN, else ``Inf``: for the error message."""
    return "NaN" if any(bool(torch.isnan(v).any()) for v in values) else "Inf"


def _valid(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` at real-token positions, as ``[n, channels]``."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    return x[mask]


class Observer:
    """Base: running min/max of everything seen (the min-max observer)."""

    name = "minmax"

    def __init__(self) -> None:
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.count = 0  # tokens (rows) observed

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if mask is None:
            lo, hi = torch.aminmax(x)
            rows = x.numel() // max(x.shape[-1], 1)
        else:
            # Reduce over channels first (no copy of x), then pick real tokens.
            lo_t, hi_t = torch.aminmax(x, dim=-1)
            lo, hi = lo_t[mask], hi_t[mask]  # [tokens, ...] for x with extra dims (KV heads)
            rows = int(mask.sum())
            if rows == 0:
                return
            lo, hi = lo.min(), hi.max()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            # min/max propagate NaN and reach +-Inf, and were taken over real tokens only.
            raise NonFiniteInput(nonfinite_kind(lo, hi))
        self._merge_minmax(lo.float(), hi.float())
        self.count += rows
        self._update_extra(x, mask)

    def _merge_minmax(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)

    def _update_extra(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Hook for subclasses that keep more than min/max."""

    @property
    def observed(self) -> bool:
        return self.max_val is not None

    def absmax(self) -> torch.Tensor:
        """The largest magnitude seen (0 if nothing was observed)."""
        if not self.observed:
            return torch.zeros(())
        return torch.maximum(self.min_val.abs(), self.max_val.abs())

    def amax(self, qmax: float, is_float: bool) -> torch.Tensor:
        """The clipping range for a symmetric scale ``amax / qmax``."""
        return self.absmax()


class ChannelMaxObserver:
    """Running ``max |x|`` per channel (last dim), for SmoothQuant: O(channels);
    with ``keep_rows``, also a :class:`RowSampler` of that many input rows (what
    SmoothQuant's alpha search scores on)."""

    name = "channel-max"

    def __init__(self, keep_rows: int = 0) -> None:
        self.amax: torch.Tensor | None = None
        self.count = 0
        self.sampler = RowSampler(keep_rows) if keep_rows else None

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        rows = _valid(x, mask)
        if rows.numel() == 0:
            return
        if self.sampler is not None:
            self.sampler.update(rows)
        a = rows.abs().float().amax(dim=0)
        if not torch.isfinite(a).all():
            raise NonFiniteInput(nonfinite_kind(a))
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        self.count += rows.shape[0]

    @property
    def observed(self) -> bool:
        return self.amax is not None


class RowSampler:
    """Up to ``max_rows`` real-token input rows, spread evenly over the first
    batch that has them (float32, on the CPU): what a layer's output error is
    measured on after quantizing (:func:`calib.quantize.layer_output_error`)."""

    name = "row-sampler"

    def __init__(self, max_rows: int = 32) -> None:
        self.max_rows = max_rows
        self.rows: torch.Tensor | None = None
        self.count = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if self.rows is not None:
            return
        rows = _valid(x, mask)
        if rows.shape[0] == 0:
            return
        step = max(1, rows.shape[0] // self.max_rows)
        self.rows = rows[::step][: self.max_rows].to(device="cpu", dtype=torch.float32).clone()
        self.count = int(self.rows.shape[0])

    @property
    def observed(self) -> bool:
        return self.rows is not None


def histogram_percentile(hist: torch.Tensor, edge: float, percentile: float) -> float:
    """Value below which ``percentile`` % of the mass of ``hist`` lies.

    ``hist`` counts values in ``len(hist)`` equal bins over ``[0, edge]``; the
    result is interpolated linearly inside the bin where the cumulative count
    crosses the target.
    """
    total = float(hist.sum())
    if total == 0:
        return 0.0
    target = total * percentile / 100.0
    cum = torch.cumsum(hist.double(), 0)
    idx = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item())
    idx = min(idx, hist.numel() - 1)
    before = float(cum[idx - 1]) if idx > 0 else 0.0
    in_bin = float(hist[idx])
    width = edge / hist.numel()
    frac = (target - before) / in_bin if in_bin > 0 else 1.0
    return (idx + min(max(frac, 0.0), 1.0)) * width


def expected_sq_error(centers: torch.Tensor, counts: torch.Tensor, clip: torch.Tensor,
                      qmax: float, is_float: bool) -> torch.Tensor:
    """Expected squared quantization error of a histogram for each clip value.

    Values above ``clip`` cost ``(v - clip)^2``; values below cost the rounding
    noise of a uniform error over one grid step, ``step^2 / 12``. For INT the
    step is ``clip / qmax``; for FP8 E4M3 it is ``2^(e - 3)`` times the scale at
    exponent ``e = floor(log2(v / scale))`` (3 mantissa bits; subnormals below
    ``2^-6`` share the step ``2^-9``).
    ``centers``/``counts``: ``[bins]``; ``clip``: ``[k]``; returns ``[k]``.
    """
    v = centers.unsqueeze(0)  # [1, bins]
    c = clip.unsqueeze(1)  # [k, 1]
    scale = c / qmax
    if is_float:
        exp = torch.floor(torch.log2(torch.clamp(v / scale, min=2.0 ** -6)))
        step = torch.pow(2.0, exp - 3) * scale
    else:
        step = scale  # broadcasts over the bins
    err = torch.where(v > c, (v - c) ** 2, step ** 2 / 12.0)
    return (err * counts.unsqueeze(0)).sum(dim=1)


class HistogramObserver(Observer):
    """Min-max plus a histogram of ``|x|`` with a fixed number of bins.

    The histogram covers ``[0, edge]``. When a batch exceeds ``edge`` the range
    doubles as often as needed and adjacent bins are summed pairwise, which
    re-bins exactly (old edges are new edges), so memory stays O(bins) and no
    count moves to a wrong bin.
    """

    def __init__(self, bins: int = 2048) -> None:
        super().__init__()
        if not BINS_MIN <= bins <= BINS_MAX or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two from {BINS_MIN} to {BINS_MAX}, got {bins}")
        self.bins = bins
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.edge = 0.0

    def _grow_to(self, top: float) -> None:
        if self.edge == 0.0:
            self.edge = top
            return
        doublings = math.ceil(math.log2(top / self.edge))
        factor = 2 ** doublings
        if factor >= self.bins:
            merged = torch.zeros(self.bins, dtype=torch.float64)
            merged[0] = self.hist.sum()
        else:
            merged = torch.zeros(self.bins, dtype=torch.float64)
            merged[: self.bins // factor] = self.hist.reshape(-1, factor).sum(dim=1)
        self.hist = merged
        self.edge *= factor

    def _update_extra(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        top = float(self.absmax())
        if top == 0.0:
            return
        if top > self.edge:
            self._grow_to(top)
        v = _valid(x, mask) if mask is not None else x
        # One pass over the signed values with 2*bins bins on [-edge, edge], then
        # fold: bin bins+i holds |x| in bin i from above, bin bins-1-i from below.
        # (Cheaper than materialising |x| and its bin indices.)
        signed = torch.histc(v.float(), bins=2 * self.bins, min=-self.edge, max=self.edge)
        self.hist += (signed[self.bins:] + signed[: self.bins].flip(0)).to(torch.float64)

    def centers(self) -> torch.Tensor:
        width = self.edge / self.bins
        return (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width


class PercentileObserver(HistogramObserver):
    """Clips at the ``percentile`` of ``|x|`` (e.g. 99.99): rare outliers stop
    stretching the grid that every other value shares."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(bins)
        self.percentile = float(percentile)

    def amax(self, qmax: float, is_float: bool) -> torch.Tensor:
        if not self.observed:
            return torch.zeros(())
        clip = histogram_percentile(self.hist, self.edge, self.percentile)
        return torch.minimum(torch.tensor(clip, dtype=torch.float32), self.absmax())


class MSEObserver(HistogramObserver):
    """Picks the clip value that minimises the expected squared quantization
    error over the observed histogram (:func:`expected_sq_error`), searching
    ``grid`` candidates between 30 % and 100 % of the max."""

    name = "mse"

    def __init__(self, bins: int = 2048, grid: int = 100, norm: float = 2.0) -> None:
        super().__init__(bins)
        if norm != 2.0:
            raise ValueError("mse observer: only norm 2 (squared error) is implemented")
        self.grid = int(grid)

    def amax(self, qmax: float, is_float: bool) -> torch.Tensor:
        top = self.absmax()
        if not self.observed or float(top) == 0.0:
            return top
        candidates = torch.linspace(0.3, 1.0, self.grid, dtype=torch.float64) * float(top)
        centers, chunk = self.centers(), max(1, _MSE_CELLS // self.bins)
        errors = torch.cat([expected_sq_error(centers, self.hist, part, qmax, is_float)
                            for part in candidates.split(chunk)])
        return candidates[int(torch.argmin(errors))].to(torch.float32)


def make_observer(name: str, kwargs: dict | None = None) -> Observer:
    kwargs = dict(kwargs or {})
    if name == "minmax":
        return Observer()
    if name == "percentile":
        return PercentileObserver(**kwargs)
    if name == "mse":
        return MSEObserver(**kwargs)
    raise ValueError(f"unknown observer {name!r}")


def weight_amax_mse(w: torch.Tensor, amax: torch.Tensor, qmax: float, is_float: bool,
                    grid: int = 40, low: float = 0.5, norm: float = 2.0) -> torch.Tensor:
    """Per-row clip search for weights: for each candidate shrink ``p`` in
    ``[low, 1]`` quantize-dequantize ``w`` with ``amax * p`` and keep, per scale
    row, the ``p`` with the least ``sum |error|^norm`` (2: the squared error; a
    larger norm weighs the largest errors more, i.e. clips less). ``amax`` is
    ``[out, 1]`` or ``[1]``.
    """
    from calib.qmath import quantize_fp8, quantize_int, symmetric_scale

    w = w.detach().to(torch.float32)
    best_err = torch.full(amax.shape, float("inf"))
    best = amax.clone()
    for p in torch.linspace(low, 1.0, grid):
        cand = amax * p
        scale = symmetric_scale(cand, qmax)
        q = quantize_fp8(w, scale) if is_float else quantize_int(w, scale, qmin=-int(qmax) - 1, qmax=int(qmax))
        err = (q.to(torch.float32) * scale - w).pow(2) if norm == 2.0 else (q.to(torch.float32) * scale - w).abs().pow(norm)
        err = err.sum(dim=1, keepdim=True) if amax.dim() == 2 else err.sum().reshape(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    return best


__all__ = [
    "FP8_MAX",
    "HistogramObserver",
    "MSEObserver",
    "NonFiniteInput",
    "Observer",
    "PercentileObserver",
    "expected_sq_error",
    "histogram_percentile",
    "make_observer",
    "weight_amax_mse",
]
