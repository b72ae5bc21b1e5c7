"""Observers against slow references (torch.quantile, full histograms, brute force)."""

import pytest
import torch

from calib.observers import (
    ChannelMaxObserver,
    HistogramObserver,
    MSEObserver,
    NonFiniteInput,
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


ALL_OBSERVERS = (Observer, lambda: PercentileObserver(99.9), lambda: MSEObserver(bins=256), ChannelMaxObserver)


@pytest.mark.parametrize("make", ALL_OBSERVERS)
@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "Inf"), (float("-inf"), "Inf")])
def test_nonfinite_value_at_a_real_token_is_an_error(make, value, kind):
    """No dropping: a scale from a model that makes NaN/Inf would hide the broken model."""
    x = torch.randn(1, 4, 8)
    x[0, 1, 2] = value
    obs = make()
    with pytest.raises(NonFiniteInput) as info:
        obs.update(x)
    assert info.value.kind == kind
    assert not obs.observed  # nothing of the bad batch was kept


@pytest.mark.parametrize("make", ALL_OBSERVERS)
def test_input_that_is_only_nan_is_an_error_not_an_unobserved_module(make):
    """Before, an all-NaN input left the observer empty, and the module borrowed
    its siblings' range (the fallback meant for MoE experts that saw no tokens)."""
    obs = make()
    obs.update(torch.randn(1, 3, 8))
    with pytest.raises(NonFiniteInput, match="NaN"):
        obs.update(torch.full((1, 3, 8), float("nan")))


@pytest.mark.parametrize("make", ALL_OBSERVERS)
def test_nan_and_inf_at_padding_positions_are_ignored(make):
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x[0, 3] = float("nan")
    x[0, 4] = float("inf")
    obs = make()
    obs.update(x, mask)
    assert obs.count == 8
    if isinstance(obs, ChannelMaxObserver):
        assert torch.equal(obs.amax, x[mask].abs().amax(dim=0))
    else:
        assert float(obs.absmax()) == float(x[mask].abs().max())
        if isinstance(obs, PercentileObserver):
            assert obs.hist.sum() == x[mask].numel()


def test_kv_shaped_states_with_nan_padding_are_ignored_and_real_nan_is_an_error():
    """Keys arrive as [batch, seq, kv_heads, head_dim]: the mask covers [batch, seq]."""
    k = torch.randn(2, 6, 2, 4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    k[1, 4:] = float("nan")
    obs = Observer()
    obs.update(k, mask)
    assert float(obs.absmax()) == float(k[mask].abs().max())
    k[0, 2, 1, 3] = float("nan")
    with pytest.raises(NonFiniteInput):
        obs.update(k, mask)


def test_mse_search_in_chunks_picks_the_same_clip_as_one_pass():
    """65536 bins x 100 candidates is evaluated in chunks (bounded memory), same argmin."""
    torch.manual_seed(1)
    x = torch.randn(50_000).abs()
    x[:5] = 30.0
    obs = MSEObserver(bins=65536, grid=100)
    obs.update(x.reshape(1, -1, 1))
    candidates = torch.linspace(0.3, 1.0, 100, dtype=torch.float64) * float(obs.absmax())
    errors = expected_sq_error(obs.centers(), obs.hist, candidates, 127.0, False)
    assert float(obs.amax(127.0, False)) == float(candidates[int(torch.argmin(errors))].float())


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
