"""`calib eval` and the served-model emulation (calib.emulate): the server's math
checked against hand-computed values and torch casts, and whole checkpoints
checked against an independent reader (transformers + compressed-tensors)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from calib import qmath
from calib.cli import main
from calib.emulate import (
    fake_quantize_activation,
    fake_quantize_kv,
    fused_groups,
    load_served,
    requantize_to_max_scale,
)
from calib.evaluate import kl_from_top_k, top_k_reference, token_windows, window_nll
from calib.recipe import QuantArgs
from conftest import TINYSTORIES

FP8_STATIC = QuantArgs(num_bits=8, type="float", strategy="tensor")
INT8_STATIC = QuantArgs(num_bits=8, type="int", strategy="tensor")
INT8_TOKEN = QuantArgs(num_bits=8, type="int", strategy="token", dynamic=True)


def test_static_activations_hand_computed():
    x = torch.tensor([[0.5, 1.26, -300.0, 0.004]])
    # INT8: round(x / 0.01) = 50, 126, -30000 -> -128, 0 (0.4 rounds to 0)
    assert torch.equal(fake_quantize_activation(x, INT8_STATIC, torch.tensor([0.01])),
                       torch.tensor([[50, 126, -128, 0]]) * torch.tensor(0.01))
    # with a zero point 10: q = clamp(round(x / s) + 10) - 10: the clip moves to 117 and -138
    out = fake_quantize_activation(x, INT8_STATIC, torch.tensor([0.01]), torch.tensor([10], dtype=torch.int8))
    assert torch.allclose(out, torch.tensor([[0.5, 1.17, -1.38, 0.0]]))
    # FP8: the torch cast of the clamped quotient, times the scale
    s = torch.tensor([0.5])
    expected = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(fake_quantize_activation(x, FP8_STATIC, s), expected)
    assert fake_quantize_activation(x, FP8_STATIC, s)[0, 2] == -224.0  # -600 saturates at -448, not NaN


def test_dynamic_per_token_scales_are_each_rows_own():
    x = torch.tensor([[2.54, -1.0, 0.5], [0.0, 0.0, 0.0], [254.0, 1.0, -127.0]])
    out = fake_quantize_activation(x, INT8_TOKEN)
    assert torch.allclose(out[0], torch.tensor([127.0, -50.0, 25.0]) * (2.54 / 127))  # s = amax / 127 = 0.02
    assert torch.equal(out[1], torch.zeros(3))  # a zero row stays zero (floored scale, no NaN)
    assert torch.equal(out[2], torch.tensor([254.0, 0.0, -128.0]))  # s = 2: 0.5 and -63.5 round half to even
    fp8 = fake_quantize_activation(x, QuantArgs(type="float", strategy="token", dynamic=True))
    assert torch.equal(fp8[2, 0], torch.tensor(254.0))  # each row's amax is exact on its own grid


def test_fused_shards_are_requantized_to_the_largest_scale_as_vllm_does():
    a = torch.tensor([[448.0, 3.0], [-1.0, 0.5]]).to(torch.float8_e4m3fn)
    b = torch.tensor([[448.0, 7.0], [-13.0, 2.0]]).to(torch.float8_e4m3fn)
    (qa, qb), largest = requantize_to_max_scale([a, b], [torch.tensor([1.0]), torch.tensor([4.0])])
    assert largest.item() == 4.0
    assert torch.equal(qb.float(), b.float())  # the largest-scale shard is unchanged
    # a's values / 4 on the FP8 grid: 112, 0.75, -0.25, 0.125
    assert torch.equal(qa.float(), torch.tensor([[112.0, 0.75], [-0.25, 0.125]]))
    assert fused_groups(["m.l.0.q_proj", "m.l.0.k_proj", "m.l.0.v_proj", "m.l.0.o_proj", "m.e.3.w1", "m.e.3.w3",
                         "m.e.3.w2", "x.query"]) == [["m.l.0.q_proj", "m.l.0.k_proj", "m.l.0.v_proj"],
                                                     ["m.e.3.w1", "m.e.3.w3"]]


def test_served_linear_computes_quantized_input_times_stored_weight(checkpoints, tinystories_split):
    folder = checkpoints["fp8-static-kv"][0]
    served = load_served(folder)
    stored = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    w = stored[f"{name}.weight"].float() * stored[f"{name}.weight_scale"].float()
    s = stored[f"{name}.input_scale"].float()
    seen = {}
    module = served.model.model.layers[1].mlp.down_proj
    handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    tok = transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))
    windows = token_windows(tok, tinystories_split[1], 64, max_windows=2)
    cache = served.new_cache()
    window_nll(served.model, windows, new_cache=served.new_cache)
    handle.remove()
    # the input reaching the GEMM is on the FP8 grid of the stored input scale
    x = seen["x"]
    assert torch.equal(x, (x / s).to(torch.float8_e4m3fn).float() * s)
    assert torch.allclose(seen["y"], x @ w.T, atol=1e-5, rtol=1e-4)
    # the cache holds K/V on the grid of the stored k_scale/v_scale
    ks = stored["model.layers.0.self_attn.k_scale"].float()
    keys = torch.randn(1, 2, 3, 8) * 5
    assert torch.equal(fake_quantize_kv(keys, ks), (keys / ks).clamp(-448, 448).to(torch.float8_e4m3fn).float() * ks)
    assert cache is not None and len(served.kv_scales) == 4


def test_served_model_matches_transformers_where_both_compute_the_same(checkpoints, tinystories_split):
    """Without the KV cache (which compressed-tensors does not apply) and with one shared scale per
    fused layer (so vLLM's re-quantization is exact), the emulation and transformers + compressed-tensors
    must agree to float rounding: two independent implementations of the same W8A8 math."""
    tok = transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))
    windows = token_windows(tok, tinystories_split[1], 128, max_windows=8)
    # Dynamic INT8 differs by design: vLLM's per-token scale is amax / 127, compressed-tensors' 2 amax / 255.
    for recipe, rel in (("fp8-static-kv", 2e-5), ("int8-w8a8-static", 2e-5), ("int8-w8a8-dynamic", 2e-3)):
        folder = checkpoints[recipe][0]
        ours, _ = window_nll(load_served(folder).model, windows)
        ct = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        theirs, _ = window_nll(ct, windows)
        assert ours == pytest.approx(theirs, rel=rel), recipe
        if rel > 2e-5:
            assert ours != pytest.approx(theirs, rel=2e-5), "the two dynamic INT8 divisors should differ"


def test_differing_shard_scales_are_requantized_on_load(checkpoints, tmp_path):
    """A checkpoint with one scale per shard (llm-compressor's layout): the served k_proj is the
    stored k_proj re-quantized to q/k/v's largest scale, and the served input scale is the largest."""
    folder = tmp_path / "per-shard"
    shutil.copytree(checkpoints["fp8-static"][0], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    base = "model.layers.2.self_attn"
    w = tensors[f"{base}.k_proj.weight"].float() * tensors[f"{base}.k_proj.weight_scale"]
    small = tensors[f"{base}.k_proj.weight_scale"] * 0.37
    tensors[f"{base}.k_proj.weight"] = qmath.quantize_fp8(w, small)
    tensors[f"{base}.k_proj.weight_scale"] = small
    tensors[f"{base}.v_proj.input_scale"] = tensors[f"{base}.v_proj.input_scale"] * 2
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    served = load_served(folder)
    q_scale = tensors[f"{base}.q_proj.weight_scale"]
    assert q_scale > small
    expected = qmath.quantize_fp8(tensors[f"{base}.k_proj.weight"].to(torch.float16) * small.reshape(()), q_scale)
    attn = served.model.model.layers[2].self_attn
    assert torch.equal(attn.k_proj.weight.data, expected.float() * q_scale)
    assert not torch.equal(attn.k_proj.weight.data, tensors[f"{base}.k_proj.weight"].float() * small)
    assert any("(1 with differing shard scales, rounded twice)" in n for n in served.notes)
    # calib's own layout: one scale per fused layer, nothing rounded twice
    assert any("nothing to re-quantize" in n for n in load_served(checkpoints["fp8-static"][0]).notes)


def test_calib_eval_command_side_by_side(checkpoints, tinystories_split, tmp_path, capsys):
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(tinystories_split[1], encoding="utf-8")
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(TINYSTORIES), "--quantized", str(checkpoints["fp8-static-kv"][0]),
                 "--dataset", str(heldout), "--seq-len", "128", "--max-tokens", "4096", "--backend", "calib",
                 "--backend", "weights", "--json", str(out), "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "quantized (calib)" in table and "quantized (weights)" in table and "KV cache" in table
    result = json.loads(out.read_text())
    assert result["metric"] == "perplexity" and result["windows"] == 32 and result["tokens"] == 4096
    tok = transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))
    original = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES), dtype=torch.float32).eval()
    nll, count = window_nll(original, token_windows(tok, tinystories_split[1], 128, max_windows=32))
    assert result["original_value"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-6)
    served, weights = result["backends"]["calib"], result["backends"]["weights"]
    # quantizing activations and the KV cache costs more than the weights alone; both are small
    assert 1.0 < weights["ratio"] < served["ratio"] < 1.05
    # and moves the next-token distribution further from the original's (KL > 0 for any change)
    assert 0.0 < weights["kl_per_token"] < served["kl_per_token"] < 0.05
    assert 0.9 < served["top1_agreement"] <= weights["top1_agreement"] < 1.0
    assert "KL/token" in table and "top-1 same" in table


def test_kl_over_the_top_k_plus_tail_is_the_coarsened_kl():
    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(3, 5, 40) * 2, dim=-1)
    q = torch.log_softmax(p + 0.3 * torch.randn(3, 5, 40), dim=-1)
    full = (p.exp() * (p - q)).sum(-1)
    values, ids = top_k_reference(p, k=40)  # every token kept: the full KL
    assert torch.allclose(kl_from_top_k(values, ids, q), full, atol=1e-6)
    values, ids = top_k_reference(p, k=8)
    coarse = kl_from_top_k(values, ids, q)
    # by hand: 8 outcomes + one for the rest
    pt, qt = values.exp(), q.gather(-1, ids.long()).exp()
    pr, qr = 1 - pt.sum(-1), 1 - qt.sum(-1)
    expected = (pt * (pt.log() - qt.log())).sum(-1) + pr * (pr.log() - qr.log())
    assert torch.allclose(coarse, expected, atol=1e-6)
    assert bool((coarse <= full + 1e-6).all()) and bool((coarse > 0).all())
    assert torch.equal(kl_from_top_k(values, ids, p), torch.zeros_like(coarse))  # the same model: 0


def test_eval_refuses_a_checkpoint_of_another_model(checkpoints, tmp_path, capsys):
    other = tmp_path / "other"
    config = transformers.LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4)
    transformers.LlamaForCausalLM(config).save_pretrained(other)
    shutil.copy(TINYSTORIES / "tokenizer.json", other / "tokenizer.json")
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if (TINYSTORIES / extra).exists():
            shutil.copy(TINYSTORIES / extra, other / extra)
    assert main(["eval", "--model", str(other), "--quantized", str(checkpoints["fp8-static"][0]),
                 "--no-progress"]) == 2
    assert "vocab_size is 512 in the checkpoint and 600 in the original" in capsys.readouterr().err
    # the original model folder is no quantized checkpoint
    assert main(["eval", "--model", str(TINYSTORIES), "--quantized", str(TINYSTORIES), "--no-progress"]) == 2
    assert "no quantization_config" in capsys.readouterr().err
