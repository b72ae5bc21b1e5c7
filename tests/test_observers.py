"""Observers against slow references (torch.quantile, full histograms, brute force)."""

import torch

from calib.observers import (
    HistogramObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    expected_sq_error,
    histogram_percentile,
)


def batches(seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)
    # growing magnitudes force the histogram range to grow several times
    return [torch.randn(2, 64, 32, generator=gen) * (1.5 ** i) for i in range(n)]


def test_minmax_matches_reference():
    obs = Observer()
    data = batches()
    for x in data:
        obs.update(x)
    everything = torch.cat([x.flatten() for x in data])
    assert obs.min_val == everything.min() and obs.max_val == everything.max()
    assert obs.absmax() == everything.abs().max()
    assert obs.count == sum(x.shape[0] * x.shape[1] for x in data)


def test_padding_positions_never_reach_the_observer():
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x[0, 3:] = 1e6  # garbage at padding positions
    for obs in (Observer(), PercentileObserver(100.0)):
        obs.update(x, mask)
        assert float(obs.absmax()) == float(x[mask].abs().max()) < 1e6
        assert obs.count == 8
    pct = PercentileObserver(100.0)
    pct.update(x, mask)
    assert pct.hist.sum() == x[mask].numel()


def test_nonfinite_values_are_dropped_and_counted():
    x = torch.randn(1, 4, 8)
    x[0, 1, 2] = float("nan")
    x[0, 2, 3] = float("inf")
    obs = PercentileObserver(100.0)
    obs.update(x)
    finite = x[torch.isfinite(x)]
    assert obs.nonfinite == 2
    assert float(obs.absmax()) == float(finite.abs().max())
    assert obs.hist.sum() == finite.numel()


def test_histogram_growth_rebins_exactly():
    obs = HistogramObserver(bins=256)
    data = batches(n=5)
    for x in data:
        obs.update(x)
    everything = torch.cat([x.abs().flatten() for x in data])
    assert obs.edge >= float(everything.max())
    reference = torch.histc(everything, bins=256, min=0, max=obs.edge).double()
    # range doubling merges whole bins, so counts match a histogram built at the final range
    # up to values sitting exactly on a bin edge (float rounding): allow a handful
    assert obs.hist.sum() == everything.numel()
    assert (obs.hist - reference).abs().sum() <= 4


def test_percentile_matches_torch_quantile():
    obs = PercentileObserver(percentile=99.9, bins=4096)
    data = batches(seed=1, n=4)
    for x in data:
        obs.update(x)
    everything = torch.cat([x.abs().flatten() for x in data])
    exact = torch.quantile(everything, 0.999)
    got = float(obs.amax(448.0, True))
    bin_width = obs.edge / obs.bins
    # Quantile definitions differ inside the gap between two order statistics:
    # the result must lie between the neighbours of the target rank (+- one bin).
    ordered = everything.sort().values
    rank = 0.999 * (everything.numel() - 1)
    low, high = float(ordered[int(rank) - 1]), float(ordered[int(rank) + 2])
    assert low - bin_width <= got <= high + bin_width
    assert abs(got - float(exact)) < 0.01 * float(exact)
    assert got < float(everything.max())


def test_histogram_percentile_hand_values():
    hist = torch.tensor([50.0, 30.0, 20.0, 0.0])  # 4 bins over [0, 4]
    assert histogram_percentile(hist, 4.0, 50.0) == 1.0
    assert abs(histogram_percentile(hist, 4.0, 65.0) - 1.5) < 1e-9
    assert histogram_percentile(hist, 4.0, 100.0) == 3.0


def test_observer_state_is_o_bins_not_o_data():
    obs = PercentileObserver(bins=512)
    for x in batches(n=3):
        obs.update(x)
    tensors = [v for v in vars(obs).values() if isinstance(v, torch.Tensor)]
    assert sum(t.numel() for t in tensors) <= 512 + 2


def test_expected_error_matches_brute_force_for_int8():
    torch.manual_seed(0)
    x = torch.randn(200_000).abs() * 2
    x[:20] = 40.0  # a few outliers
    obs = MSEObserver(bins=2048, grid=50)
    obs.update(x.reshape(1, -1, 1))
    clip = obs.amax(127.0, False)
    def mse(c):
        s = c / 127
        return ((torch.clamp(torch.round(x / s), -127, 127) * s - x) ** 2).mean()
    candidates = torch.linspace(0.3, 1.0, 50) * 40.0
    brute = min(candidates.tolist(), key=lambda c: float(mse(torch.tensor(c))))
    # the histogram model picks a clip whose true error is within 5 % of the best candidate's
    assert float(mse(clip)) <= 1.05 * float(mse(torch.tensor(brute)))
    assert float(clip) < 40.0  # outliers are clipped


def test_expected_sq_error_hand_values():
    centers = torch.tensor([1.0, 3.0], dtype=torch.float64)
    counts = torch.tensor([2.0, 1.0], dtype=torch.float64)
    err = expected_sq_error(centers, counts, torch.tensor([2.0], dtype=torch.float64), 127.0, False)
    step = 2.0 / 127
    assert abs(float(err[0]) - (2 * step ** 2 / 12 + 1.0)) < 1e-12


def test_unobserved_expert_takes_the_largest_range_of_its_siblings():
    from calib.quantize import _shared_fallback

    observed = {
        "model.layers.0.mlp.experts.0.w1": torch.tensor(2.0),
        "model.layers.0.mlp.experts.1.w1": torch.tensor(5.0),
        "model.layers.0.mlp.experts.1.w2": torch.tensor(9.0),  # other role: not a sibling
        "model.layers.1.mlp.experts.0.w1": torch.tensor(7.0),  # other layer: not a sibling
    }
    assert float(_shared_fallback("model.layers.0.mlp.experts.7.w1", observed)) == 5.0
    assert _shared_fallback("model.layers.0.mlp.experts.7.w3", observed) is None
    assert _shared_fallback("lm_head", observed) is None
