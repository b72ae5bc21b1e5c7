"""SmoothQuant: an exact rewrite of the float model that flattens activation ranges."""

import pytest
import torch
import transformers

import calib
from calib.algorithms.smoothquant import smoothing_pairs, smoothing_scales
from calib.data import build_calibration_set
from calib.quantize import plan_for
from calib.recipe import SmoothQuantArgs
from conftest import TINYSTORIES


def test_smoothing_scales_hand_values():
    act = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([[1.0, 0.25, 3.0], [-0.5, 0.5, 1.0]])  # column amax: 1, 0.5, 3
    s = smoothing_scales(act, [w], alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, (1.0 / 0.5) ** 0.5, 1.0]))  # unseen channel: 1


def test_pairs_cover_llama_norms_and_up_to_down():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES))
    pairs = smoothing_pairs(model, plan_for(model, calib.load_recipe("int8-w8a8-static")).targets)
    producers = {p.producer for p in pairs}
    assert len(pairs) == 12  # 4 layers x (input norm, post-attention norm, up_proj)
    assert "model.layers.0.input_layernorm" in producers and "model.layers.3.mlp.up_proj" in producers
    first = next(p for p in pairs if p.producer == "model.layers.0.input_layernorm")
    assert first.consumers == [f"model.layers.0.self_attn.{x}_proj" for x in "qkv"]


def test_smoothing_keeps_the_function_and_flattens_the_inputs(tinystories_split):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))
    ids = tok(tinystories_split[1][:3000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        before = model(ids).logits
    data = build_calibration_set(tok, tinystories_split[0], num_samples=32, seq_len=128)
    plain = calib.calibrate(model, calib.load_recipe("int8-w8a8-static").model_copy(update={"smoothquant": None}),
                            data, batch_size=16, progress=False)
    recipe = calib.load_recipe("int8-w8a8-static").model_copy(update={"smoothquant": SmoothQuantArgs(alpha=0.8)})
    smoothed = calib.calibrate(model, recipe, data, batch_size=16, progress=False)
    assert smoothed.smoothed == 12
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # same function
    name = "model.layers.2.mlp.down_proj"
    # the per-tensor range the input scale must cover shrinks
    assert float(smoothed.input_observers[name].absmax()) < float(plain.input_observers[name].absmax())


def test_unsupported_model_is_a_clear_error(tmp_path):
    from calib.data import CalibrationSet
    from calib.errors import CalibInputError

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    data = CalibrationSet(samples=[torch.arange(10)], source="ids", seq_len=10, packed=True, seed=0)
    with pytest.raises(CalibInputError, match="no norm -> projection pairs"):
        calib.calibrate(model, calib.load_recipe("int8-w8a8-static"), data, progress=False)
