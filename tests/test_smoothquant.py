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


def test_pairs_cover_llama_norms_up_to_down_and_v_to_o():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES))
    pairs = smoothing_pairs(model, plan_for(model, calib.load_recipe("int8-w8a8-static")).targets)
    producers = {p.producer for p in pairs}
    assert len(pairs) == 16  # 4 layers x (input norm, post-attention norm, up_proj, v_proj)
    assert "model.layers.0.input_layernorm" in producers and "model.layers.3.mlp.up_proj" in producers
    first = next(p for p in pairs if p.producer == "model.layers.0.input_layernorm")
    assert first.consumers == [f"model.layers.0.self_attn.{x}_proj" for x in "qkv"]
    value = next(p for p in pairs if p.producer == "model.layers.0.self_attn.v_proj")
    # 4 query heads, 2 value heads of 16: query heads 0, 1 read value head 0
    assert value.consumers == ["model.layers.0.self_attn.o_proj"] and value.producer_channels == 32
    assert value.source.tolist() == [*range(16), *range(16), *range(16, 32), *range(16, 32)]


def test_value_channels_hand_values():
    from calib.algorithms.smoothquant import value_channels

    assert value_channels(4, 2, 2).tolist() == [0, 1, 0, 1, 2, 3, 2, 3]  # grouped-query: 2 heads a value head
    assert value_channels(2, 2, 2, base=4).tolist() == [4, 5, 6, 7]  # Phi-3: after q (2 x 2) and k (2 x 2)
    assert value_channels(2, 2, 2, base=4, stride=6).tolist() == [4, 5, 10, 11]  # GPT-NeoX: [q k v] per head


def test_tied_channels_share_one_scale_and_the_producer_keeps_unread_rows():
    from calib.algorithms.smoothquant import SmoothPair, tie

    source = torch.tensor([0, 1, 0, 1])  # two query heads of 2 channels reading one value head
    torch.testing.assert_close(tie(torch.tensor([1.0, 8.0, 4.0, 2.0]), source), torch.tensor([4.0, 8.0, 4.0, 8.0]))
    act = torch.tensor([1.0, 8.0, 4.0, 2.0])
    w = torch.tensor([[1.0, 0.5, 4.0, 0.5], [1.0, 0.5, 1.0, 2.0]])  # column amax 1, 0.5, 4, 2 -> tied 4, 2
    s = smoothing_scales(act, [w], alpha=0.5, source=source)
    expected = torch.tensor([(4.0 / 4.0) ** 0.5, (8.0 / 2.0) ** 0.5])
    torch.testing.assert_close(s, expected[source])
    pair = SmoothPair("gate_up", ["down"], source=torch.tensor([2, 3]), producer_channels=4)  # up: rows 2, 3
    assert pair.producer_scales(torch.tensor([2.0, 3.0])).tolist() == [1.0, 1.0, 2.0, 3.0]


def _stories(tinystories_split):
    """The TinyStories Llama, held-out ids, its logits on them, and 32 x 128 calibration tokens."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))
    ids = tok(tinystories_split[1][:3000], return_tensors="pt")["input_ids"][:, :128]
    with torch.no_grad():
        before = model(ids).logits
    return model, ids, before, build_calibration_set(tok, tinystories_split[0], num_samples=32, seq_len=128)


def test_smoothing_keeps_the_function_and_flattens_the_inputs(tinystories_split):
    model, ids, before, data = _stories(tinystories_split)
    plain = calib.calibrate(model, calib.load_recipe("int8-w8a8-static").model_copy(update={"smoothquant": None}),
                            data, batch_size=16, progress=False)
    recipe = calib.load_recipe("int8-w8a8-static").model_copy(update={"smoothquant": SmoothQuantArgs(alpha=0.8)})
    smoothed = calib.calibrate(model, recipe, data, batch_size=16, progress=False)
    assert smoothed.smoothed == 16
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)  # same function
    name = "model.layers.2.mlp.down_proj"
    # the per-tensor range the input scale must cover shrinks
    assert float(smoothed.input_observers[name].absmax()) < float(plain.input_observers[name].absmax())


FAMILY_PAIRS = {"llama": 8, "qwen2": 8, "gemma": 8, "gemma2": 8, "phi3": 8, "opt": 8, "gpt_neox": 6, "bert": 2}


def _family_model(family: str):
    from test_native_names import COMMON, FAMILIES, auto_class

    torch.manual_seed(0)
    if family == "gemma2":
        return transformers.AutoModelForCausalLM.from_config(
            transformers.Gemma2Config(num_key_value_heads=2, head_dim=16, **COMMON)).eval()
    return auto_class(family).from_config(FAMILIES[family]()).eval()


def _ids_data(count=8, length=24):
    from calib.data import CalibrationSet

    gen = torch.Generator().manual_seed(0)
    return CalibrationSet(samples=[torch.randint(3, 500, (length,), generator=gen) for _ in range(count)],
                          source="random ids", seq_len=length, packed=True, seed=0)


@pytest.mark.parametrize("family", sorted(FAMILY_PAIRS))
def test_every_family_is_smoothed_and_keeps_its_function(family):
    """Llama, Qwen2, Gemma (norm weight acting as 1 + w), Gemma 2 (its pre-feedforward
    norm, never the post-attention one), Phi-3 (fused qkv and gate_up, as consumers and
    through their value and up rows as producers), OPT (fc1 -> fc2 through ReLU),
    GPT-NeoX (the value rows interleaved per head), v -> o under grouped-query
    attention, BERT (value -> attention output only): the pairs found, and the same
    outputs after rescaling."""
    model = _family_model(family)
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)[0]
    recipe = calib.load_recipe("int8-w8a8-static")
    pairs = smoothing_pairs(model, plan_for(model, recipe).targets)
    assert len(pairs) == FAMILY_PAIRS[family], [p.producer for p in pairs]
    if family == "gemma2":
        assert not any(p.producer.endswith("post_attention_layernorm") for p in pairs)
    if family == "opt":
        assert any(p.producer.endswith("fc1") and p.consumers[0].endswith("fc2") for p in pairs)
    if family == "phi3":
        up = next(p for p in pairs if p.producer.endswith("gate_up_proj"))
        width = model.config.intermediate_size
        assert up.consumers[0].endswith("mlp.down_proj") and up.source.tolist() == list(range(width, 2 * width))
    assert all(p.offset == (1.0 if family.startswith("gemma") and "norm" in p.producer else 0.0) for p in pairs)
    cal = calib.calibrate(model, recipe, _ids_data(), batch_size=4, progress=False)
    assert cal.smoothed == FAMILY_PAIRS[family]
    with torch.no_grad():
        after = model(ids)[0]
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def bert_post_layernorm_recipe(name: str = "int8-w8a8-static"):
    """``name`` with SmoothQuant mapping BERT's attention.output.LayerNorm -> intermediate.dense."""
    from calib.recipe import SmoothMapping

    recipe = calib.load_recipe(name)
    return recipe.model_copy(update={"smoothquant": recipe.smoothquant.model_copy(update={"mappings": [
        SmoothMapping(producer="attention.output.LayerNorm", consumers=["intermediate.dense"])]})})


def test_bert_post_layernorm_is_refused_and_the_model_left_as_it_was():
    """BERT's attention.output.LayerNorm feeds intermediate.dense *and* the residual:
    rescaling it changes the model (llm-compressor accepts it; calib's defaults do not
    propose it). Asked for in a recipe, both executors refuse, naming the mapping, and
    the in-memory model keeps its weights."""
    from calib.errors import CalibInputError
    from calib.sequential import calibrate_sequential

    model = _family_model("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = bert_post_layernorm_recipe()
    with pytest.raises(CalibInputError, match=r"SmoothQuant would change the model: after rescaling "
                                              r"encoder\.layer\.0\.attention\.output\.LayerNorm -> "
                                              r"encoder\.layer\.0\.intermediate\.dense"):
        calib.calibrate(model, recipe, _ids_data(), batch_size=4, progress=False)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(CalibInputError, match=r"the output of encoder\.layer\.0 on a calibration batch moved"):
        calibrate_sequential(model, lambda names: {}, recipe, _ids_data(), batch_size=4, progress=False)


def test_recipe_mappings_replace_the_defaults_and_unknown_names_are_errors():
    from calib.errors import CalibInputError
    from calib.recipe import SmoothMapping

    model = _family_model("llama")
    base = calib.load_recipe("int8-w8a8-static")
    only_qkv = SmoothQuantArgs(alpha=0.5, mappings=[SmoothMapping(
        producer="input_layernorm", consumers=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])])
    cal = calib.calibrate(model, base.model_copy(update={"smoothquant": only_qkv}), _ids_data(), batch_size=4,
                          progress=False)
    assert cal.smoothed == 2  # one pair in each of the 2 layers
    wrong = SmoothQuantArgs(mappings=[SmoothMapping(producer="input_norm", consumers=["self_attn.q_proj"])])
    with pytest.raises(CalibInputError, match=r"smoothquant\.mappings: input_norm -> self_attn\.q_proj names "
                                              r"modules that no layer of LlamaForCausalLM has"):
        calib.calibrate(model, base.model_copy(update={"smoothquant": wrong}), _ids_data(), progress=False)


def test_values_are_not_rescaled_when_the_kv_cache_is_quantized_and_unknown_layouts_are_errors():
    """A quantized KV cache keeps its values as observed: the default v -> o pair is
    dropped, a recipe mapping asking for it is an error; a Linear producer whose
    rows do not line up with the consumer's columns in a way calib knows is an
    error naming both widths (the defaults skip it)."""
    from calib.errors import CalibInputError

    model = _family_model("llama")
    targets = plan_for(model, calib.load_recipe("int8-w8a8-static")).targets
    assert len(smoothing_pairs(model, targets, kv_cache=True)) == 6
    assert not any(p.producer.endswith("v_proj") for p in smoothing_pairs(model, targets, kv_cache=True))
    with pytest.raises(CalibInputError, match=r"self_attn\.v_proj -> self_attn\.o_proj rescales the attention's "
                                              r"values, and the recipe quantizes the KV cache"):
        smoothing_pairs(model, targets, [("self_attn.v_proj", ["self_attn.o_proj"])], kv_cache=True)
    with pytest.raises(CalibInputError, match=r"smoothquant\.mappings: mlp\.gate_proj -> self_attn\.o_proj: "
                                              r"model\.layers\.0\.mlp\.gate_proj has 128 output channels and "
                                              r"model\.layers\.0\.self_attn\.o_proj reads 64"):
        smoothing_pairs(model, targets, [("mlp.gate_proj", ["self_attn.o_proj"])])


def _int8(strategy: str, dynamic: bool):
    from calib.recipe import QuantArgs

    return QuantArgs(num_bits=8, type="int", strategy=strategy, dynamic=dynamic)


def test_smoothing_error_is_the_hand_computed_one():
    """Per-token INT8 inputs, per-channel INT8 weights, scales s: the relative
    squared error of the consumer's output, by hand."""
    from calib.algorithms.smoothquant import smoothing_error

    x = torch.tensor([[1.0, -2.0, 0.5], [0.25, 4.0, -1.0]])
    w = torch.tensor([[0.3, -0.1, 0.2], [0.2, 0.7, -0.05]])
    s = torch.tensor([2.0, 0.5, 1.0])
    xs = x / s
    row_scale = xs.abs().amax(dim=1, keepdim=True) / 127
    qx = torch.round(xs / row_scale).clamp(-128, 127) * row_scale
    ws = w * s
    col_scale = ws.abs().amax(dim=1, keepdim=True) / 127
    qw = torch.round(ws / col_scale).clamp(-128, 127) * col_scale
    expected = float(((qx @ qw.T - x @ w.T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    got = smoothing_error(x, x.abs().amax(dim=0), [w], s, _int8("channel", False), _int8("token", True))
    assert got == pytest.approx(expected, rel=1e-5)
    assert expected > 0
    # static per-tensor inputs: one scale, the calibration range of x / s
    static = torch.round(xs / (8.0 / 127)).clamp(-128, 127) * (8.0 / 127)  # max |x / s| = 4 / 0.5
    expected = float(((static @ qw.T - x @ w.T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    got = smoothing_error(x, x.abs().amax(dim=0), [w], s, _int8("channel", False), _int8("tensor", False))
    assert got == pytest.approx(expected, rel=1e-5)


def test_alpha_search_picks_the_grid_minimum():
    from calib.algorithms.smoothquant import choose_smoothing, smoothing_error

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    x[:, 3] *= 60.0  # one outlier channel, as SmoothQuant's motivating case
    x[::17, 10] = 300.0  # and a massive value on a few tokens
    ws = [torch.randn(32, 64, generator=gen) * 0.05, torch.randn(16, 64, generator=gen) * 0.05]
    amax = x.abs().amax(dim=0)
    wa, ia = _int8("channel", False), _int8("token", True)
    grid = [0.3, 0.5, 0.7, 0.9]
    choice = choose_smoothing(amax, ws, "search", rows=x, grid=grid, weight_args=wa, input_args=ia, descend=False)
    errors = {a: smoothing_error(x, amax, ws, smoothing_scales(amax, ws, a), wa, ia) for a in grid}
    assert choice.alpha == min(errors, key=errors.get) and choice.scored == 4
    assert choice.error == pytest.approx(errors[choice.alpha])
    walked = choose_smoothing(amax, ws, "search", rows=x, grid=grid, weight_args=wa, input_args=ia)
    assert walked.alpha == choice.alpha and walked.error == choice.error  # this curve has one minimum
    assert choice.error <= choice.error_reference  # the fixed 0.8 is scored too
    torch.testing.assert_close(choice.scales, smoothing_scales(amax, ws, choice.alpha))
    fixed = choose_smoothing(amax, ws, 0.6)
    assert fixed.alpha == 0.6 and fixed.error is None
    torch.testing.assert_close(fixed.scales, smoothing_scales(amax, ws, 0.6))


def test_descend_grid_walks_downhill_from_0_8_and_scores_only_what_it_visits():
    from calib.algorithms.smoothquant import DEFAULT_GRID, descend_grid

    def walk(curve):
        seen = []
        best = descend_grid(list(DEFAULT_GRID), lambda a: seen.append(a) or curve(a))
        return best, sorted(set(seen))

    best, seen = walk(lambda a: (a - 0.45) ** 2)  # minimum left of 0.8: every alpha from 0.8 down, and 0.40
    assert best == 0.45 and seen == [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]
    best, seen = walk(lambda a: (a - 0.9) ** 2)  # right of 0.8: the left neighbour is tried first
    assert best == 0.9 and seen == [0.75, 0.8, 0.85, 0.9, 0.95]
    best, seen = walk(lambda a: abs(a - 0.8))  # at 0.8: its two neighbours only
    assert best == 0.8 and seen == [0.75, 0.8, 0.85]
    best, _ = walk(lambda a: min(abs(a - 0.3), abs(a - 0.7) + 0.01))  # two minima: the one downhill from 0.8
    assert best == 0.7  # (search: full would find 0.3; on SmolLM2 89 of 90 pairs have one minimum)
    assert descend_grid([0.2, 0.4], lambda a: a) == 0.2  # 0.4 is nearest 0.8; 0.2 is lower
    assert descend_grid([0.5], lambda a: a) == 0.5


def test_alpha_search_on_tinystories_keeps_the_function_and_reports(tinystories_split, tmp_path):
    """calib run with alpha: search: every pair gets a grid alpha whose output
    error is at most the fixed 0.8's, the model's function is unchanged, and the
    report lists the choices."""
    import json

    from calib.algorithms.smoothquant import DEFAULT_GRID

    model, ids, before, data = _stories(tinystories_split)
    recipe = calib.load_recipe("int8-w8a8-static").model_copy(
        update={"smoothquant": SmoothQuantArgs(alpha="search")})
    cal = calib.calibrate(model, recipe, data, batch_size=16, progress=False)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    assert len(cal.smoothing) == 16
    assert all(c.alpha in DEFAULT_GRID and c.error <= c.error_reference for c in cal.smoothing.values())
    assert all(2 <= c.scored < len(DEFAULT_GRID) for c in cal.smoothing.values())  # downhill from 0.8, not all 16

    recipe_file = tmp_path / "search.yaml"
    recipe_file.write_text(calib.load_recipe("int8-w8a8-static").model_copy(
        update={"smoothquant": SmoothQuantArgs(alpha="search", grid=[0.5, 0.8])}).to_yaml())
    report = calib.run(model=str(TINYSTORIES), recipe=calib.parse_recipe(recipe_file.read_text()),
                       dataset=str(tinystories_split[0]), output=tmp_path / "out", num_samples=16, seq_len=128, progress=False)
    pairs = report["smoothquant"]["pairs"]
    assert len(pairs) == 16 and {p["alpha"] for p in pairs.values()} <= {0.5, 0.8}
    assert json.loads((tmp_path / "out" / "calib_report.json").read_text())["smoothquant"]["pairs"] == pairs
