"""Scale math against hand-computed values and torch's own casts."""

import pytest
import torch

from calib import qmath


def test_fp8_scale_is_amax_over_448():
    scale = qmath.symmetric_scale(torch.tensor([4.48]), qmath.FP8_MAX)
    assert qmath.FP8_MAX == 448.0
    torch.testing.assert_close(scale, torch.tensor([0.01]))


def test_fp8_quantize_matches_torch_cast_and_clamps_instead_of_nan():
    x = torch.tensor([0.0, 1.0, -2.5, 3.3, 448.0, 500.0, -1000.0, 0.0013])
    scale = torch.tensor(1.0)
    q = qmath.quantize_fp8(x, scale)
    assert q.dtype == torch.float8_e4m3fn
    expected = torch.clamp(x, -448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    assert torch.isfinite(q.float()).all()  # an unclamped cast of 500 would give NaN
    assert q.float()[5] == 448.0 and q.float()[6] == -448.0


def test_fp8_roundtrip_relative_error_is_within_e4m3_precision():
    x = torch.randn(4096) * 3
    scale = qmath.symmetric_scale(x.abs().amax(), qmath.FP8_MAX)
    back = qmath.dequantize(qmath.quantize_fp8(x, scale), scale)
    big = x.abs() > scale * 2 ** -6 * 8  # normal range: 3 mantissa bits -> rel. error <= 2^-4
    rel = ((back - x).abs() / x.abs())[big]
    assert rel.max() <= 2 ** -4 + 1e-6


def test_int8_hand_values():
    x = torch.tensor([1.27, -1.27, 0.005, 0.015, -0.6349])
    scale = qmath.symmetric_scale(torch.tensor(1.27), 127)
    torch.testing.assert_close(scale, torch.tensor(0.01))
    q = qmath.quantize_int(x, scale)
    assert q.dtype == torch.int8
    # 0.5 and 1.5 round half to even -> 0 and 2; -63.49 -> -63
    assert q.tolist() == [127, -127, 0, 2, -63]


def test_int8_never_exceeds_range_and_max_is_exact():
    x = torch.randn(1000) * 5
    scale = qmath.symmetric_scale(x.abs().amax(), 127)
    q = qmath.quantize_int(x, scale)
    assert q.min() >= -127 and q.max() <= 127  # /127 convention: the symmetric grid never clips
    i = x.abs().argmax()
    torch.testing.assert_close(qmath.dequantize(q, scale)[i], x[i])


def test_zero_range_gets_positive_floor():
    scale = qmath.symmetric_scale(torch.zeros(3, 1), 127)
    assert (scale > 0).all() and torch.isfinite(scale).all()
    assert qmath.quantize_int(torch.zeros(3, 4), scale).eq(0).all()


def test_nonfinite_amax_is_refused():
    with pytest.raises(ValueError, match="NaN or Inf"):
        qmath.symmetric_scale(torch.tensor([float("nan")]), 448)
    with pytest.raises(ValueError, match="NaN or Inf"):
        qmath.symmetric_scale(torch.tensor([float("inf")]), 448)


def test_storage_scale_rounds_up_so_the_max_never_clips():
    amax = torch.tensor([1.0, 3.14159, 0.123456, 1e-30])
    scale = amax / 448
    for dtype in (torch.bfloat16, torch.float16):
        stored = qmath.storage_scale(scale, dtype)
        assert stored.dtype == dtype
        assert (stored.float() >= torch.clamp(scale, min=torch.finfo(dtype).tiny)).all()
        # at most one step above: the next representable value
        assert ((stored.float() - scale) / scale)[:3].max() < 2 ** -6
        assert (stored > 0).all()
    assert torch.equal(qmath.storage_scale(scale, torch.float32), scale)


def test_asymmetric_qparams_hand_values():
    scale, zp = qmath.asymmetric_qparams(torch.tensor(-1.0), torch.tensor(4.1))
    torch.testing.assert_close(scale, torch.tensor(0.02))
    assert int(zp) == -78  # round(-128 + 50)
    q = qmath.quantize_int(torch.tensor([-1.0, 0.0, 4.1]), scale, zp)
    assert q.tolist() == [-128, -78, 127]
    torch.testing.assert_close(qmath.dequantize(q, scale, zp), torch.tensor([-1.0, 0.0, 4.1]))


def test_asymmetric_range_always_contains_zero():
    scale, zp = qmath.asymmetric_qparams(torch.tensor(2.0), torch.tensor(5.1))
    q0 = qmath.quantize_int(torch.tensor(0.0), scale, zp)
    assert float(qmath.dequantize(q0, scale, zp)) == 0.0


def test_amax_shapes_per_strategy():
    w = torch.arange(24, dtype=torch.float32).reshape(4, 6) - 12
    assert qmath.amax_per_strategy(w, "tensor").shape == (1,)
    assert qmath.amax_per_strategy(w, "tensor").item() == 12
    ch = qmath.amax_per_strategy(w, "channel")
    assert ch.shape == (4, 1) and ch.flatten().tolist() == [12, 6, 5, 11]
    g = qmath.amax_per_strategy(w, "group", 3)
    assert g.shape == (4, 2) and g[0].tolist() == [12, 9]
    with pytest.raises(ValueError, match="divisible"):
        qmath.amax_per_strategy(w, "group", 4)


def test_sqnr_of_fp8_per_tensor_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    scale = qmath.symmetric_scale(w.abs().amax(), qmath.FP8_MAX)
    db = qmath.sqnr_db(w, qmath.dequantize(qmath.quantize_fp8(w, scale), scale))
    # E4M3 keeps ~3.5 bits of relative precision: about 31 dB on Gaussian data
    assert 28 < db < 34


@pytest.mark.parametrize("bits", [4, 8])
def test_int32_packing_matches_compressed_tensors(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    gen = torch.Generator().manual_seed(bits)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(low, high + 1, (6, 64), generator=gen).to(torch.int8)
    q[0, :4] = torch.tensor([low, high, 0, -1], dtype=torch.int8)
    packed = qmath.pack_int32(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (6, 64 * bits // 32)
    assert torch.equal(packed, pack_to_int32(q, bits))
    assert torch.equal(qmath.unpack_int32(packed, bits, 64), q)


def test_int4_packing_hand_value():
    # elements 0..7 = -8..-1 -> unsigned 0..7, nibble i at bits 4i: 0x76543210
    q = torch.arange(-8, 0, dtype=torch.int8).reshape(1, 8)
    assert qmath.pack_int32(q, 4).item() == 0x76543210
