"""Problems found in the model rather than the recipe: entries that match
nothing, group sizes that do not divide a layer, and NaN/Inf in weights or
activations. Structure checks run on models built on the ``meta`` device (no
weights at all: anything that reads a weight value fails there); number checks
on the trained TinyStories Llama with a corrupted weight."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

import calib
from calib.data import build_calibration_set
from calib.errors import CalibInputError
from calib.quantize import plan_for
from conftest import TINYSTORIES

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def meta_llama(hidden=576, intermediate=1536, layers=2, heads=9, kv_heads=3):
    """A Llama on the meta device (SmolLM2's widths by default): shapes only, no values."""
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=128,
                                      tie_word_embeddings=True)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def meta_bert():
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=100)
    with torch.device("meta"):
        return transformers.AutoModel.from_config(config)


def with_weights(recipe, **update):
    return recipe.model_copy(update={"weights": recipe.weights.model_copy(update=update)})


@pytest.fixture()
def tinystories():
    return transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()


@pytest.fixture(scope="module")
def calibration_data(tinystories_split):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))
    return build_calibration_set(tokenizer, tinystories_split[0], num_samples=24, seq_len=64)


def no_hooks_left(model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


# --- plan_for on a meta model: nothing is read ---------------------------------

@pytest.mark.parametrize("name", sorted(calib.bundled_recipes()))
def test_every_bundled_recipe_plans_on_a_meta_smollm2_shaped_model(name):
    model = meta_llama()
    assert model.model.layers[0].mlp.down_proj.weight.is_meta
    plan = plan_for(model, calib.load_recipe(name))
    assert len(plan.targets) == 2 * len(LINEARS)
    assert "lm_head" in plan.ignored
    assert plan.unmatched == []
    assert [sorted(g) for g in plan.fused] == [
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"],
        ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"],
    ]


def test_bundled_int4_uses_group_64_which_divides_smollm2_and_the_tiny_llamas():
    recipe = calib.load_recipe("int4-w4a16")
    assert recipe.weights.group_size == 64
    for hidden, intermediate, heads in ((576, 1536, 9), (64, 192, 4)):
        plan = plan_for(meta_llama(hidden, intermediate, heads=heads, kv_heads=heads), recipe)
        assert {m.in_features for m in plan.targets.values()} == {hidden, intermediate}


def test_group_128_on_smollm2_widths_names_the_layers_and_the_group_sizes_that_fit():
    recipe = with_weights(calib.load_recipe("int4-w4a16"), group_size=128)
    with pytest.raises(CalibInputError) as info:
        plan_for(meta_llama(), recipe)
    message = str(info.value)
    # 576 % 128 = 64: q/k/v/o and gate/up of both layers (12); down_proj (1536) divides
    assert "weights.group_size 128 does not divide the input width of 12 targeted layers" in message
    assert "model.layers.0.self_attn.q_proj (576)" in message
    assert "and 8 more" in message
    assert "down_proj" not in message
    assert "group sizes that divide every targeted layer's width: 16, 32, 64" in message


def test_group_size_with_no_power_of_two_fitting_says_use_channel():
    recipe = with_weights(calib.load_recipe("int4-w4a16"), group_size=64)
    with pytest.raises(CalibInputError) as info:
        plan_for(meta_llama(hidden=72, intermediate=200, heads=9, kv_heads=3, layers=1), recipe)
    message = str(info.value)
    assert "of 7 targeted layers: model.layers.0.self_attn.q_proj (72), " in message
    assert "and 3 more" in message
    assert "no group size from 16 to 256 that divides every targeted layer's width" in message
    assert "strategy: channel" in message


def test_group_size_check_only_counts_targeted_layers():
    """Ignoring the layers whose width does not fit makes the recipe plan."""
    recipe = with_weights(calib.load_recipe("int4-w4a16"), group_size=512)
    recipe = recipe.model_copy(update={"ignore": ["lm_head", "re:.*self_attn", "re:.*(gate|up)_proj"]})
    plan = plan_for(meta_llama(), recipe)
    assert sorted(plan.targets) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


# --- targets / ignore entries that match nothing ------------------------------

def test_ignore_regex_for_fused_names_warns_and_is_recorded(caplog):
    recipe = calib.load_recipe("fp8-dynamic").model_copy(update={"ignore": ["lm_head", "re:.*qkv_proj"]})
    with caplog.at_level(logging.INFO, logger="calib"):
        plan = plan_for(meta_llama(), recipe)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ignore entry 're:.*qkv_proj' matches no module" in warnings[0]
    assert "model.layers.0.self_attn.q_proj" in warnings[0]  # an example of the names it should match
    assert plan.unmatched == ["ignore: re:.*qkv_proj"]
    assert "model.layers.0.self_attn.q_proj" in plan.targets  # what the user meant to skip is quantized


def test_target_entry_that_matches_nothing_warns_and_is_recorded(caplog):
    recipe = calib.load_recipe("fp8-dynamic").model_copy(
        update={"targets": ["Linear", "re:.*block_sparse_moe.*"], "ignore": ["lm_head", "Conv1D"]})
    with caplog.at_level(logging.INFO, logger="calib"):
        plan = plan_for(meta_llama(), recipe)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "targets entry 're:.*block_sparse_moe.*' matches no module" in warnings[0]
    assert "ignore entry 'Conv1D' matches no module" in warnings[1]
    assert plan.unmatched == ["targets: re:.*block_sparse_moe.*", "ignore: Conv1D"]


def test_default_lm_head_ignore_on_an_encoder_is_info_not_a_warning(caplog):
    with caplog.at_level(logging.INFO, logger="calib"):
        plan = plan_for(meta_bert(), calib.load_recipe("fp8-dynamic"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "lm_head" in r.getMessage()]
    assert len(info) == 1 and "BertModel has no LM head" in info[0]
    assert plan.unmatched == []
    # query/key/value, attention.output, intermediate, output per layer, and the pooler
    assert len(plan.targets) == 2 * 6 + 1


# --- NaN / Inf in activations: an error naming the module and the batch --------

def test_nan_weight_row_names_the_first_module_that_reads_nan_and_the_batch(tinystories, calibration_data):
    with torch.no_grad():
        tinystories.model.layers[1].mlp.up_proj.weight[5] = float("nan")
    with pytest.raises(CalibInputError) as info:
        calib.calibrate(tinystories, calib.load_recipe("fp8-static"), calibration_data, batch_size=8, progress=False)
    message = str(info.value)
    # up_proj's NaN output channel is first read by down_proj (layer 2's q/k/v only later)
    assert message.startswith("model.layers.1.mlp.down_proj received NaN input at real (non-padding) tokens "
                              "in calibration batch 0")
    assert "--dtype float32" in message
    assert no_hooks_left(tinystories)


def test_batch_index_counts_the_batches_before_the_first_nan(tinystories, calibration_data):
    """Poison the embedding of one token that the first batches do not contain."""
    batches = [b["input_ids"] for b in calibration_data.batches(4, 0)]
    first_seen = {}
    for index, ids in enumerate(batches):
        for token in ids.unique().tolist():
            first_seen.setdefault(token, index)
    token, batch = max(first_seen.items(), key=lambda item: item[1])
    assert batch >= 2
    with torch.no_grad():
        tinystories.model.embed_tokens.weight[token] = float("nan")
    with pytest.raises(CalibInputError) as info:
        calib.calibrate(tinystories, calib.load_recipe("fp8-static"), calibration_data, batch_size=4, progress=False)
    assert str(info.value).startswith(f"model.layers.0.self_attn.q_proj received NaN input at real (non-padding) "
                                      f"tokens in calibration batch {batch} ")
    assert no_hooks_left(tinystories)


def test_inf_in_the_keys_names_the_attention_module(tinystories, calibration_data):
    with torch.no_grad():
        tinystories.model.layers[2].self_attn.k_proj.weight[3] = float("inf")
    with pytest.raises(CalibInputError) as info:
        calib.calibrate(tinystories, calib.load_recipe("fp8-static-kv"), calibration_data, batch_size=8,
                        progress=False)
    message = str(info.value)
    # k_proj's input is finite; the first NaN/Inf is in the keys handed to the KV cache
    assert message.startswith("model.layers.2.self_attn (keys) received ")
    assert "calibration batch 0" in message
    assert no_hooks_left(tinystories)


def test_nan_is_caught_in_the_smoothquant_pass_before_any_rescaling(tinystories, calibration_data):
    with torch.no_grad():
        tinystories.model.layers[1].mlp.up_proj.weight[5] = float("nan")
        before = tinystories.model.layers[0].input_layernorm.weight.clone()
    with pytest.raises(CalibInputError, match=r"^model\.layers\.1\.mlp\.down_proj received NaN input"):
        calib.calibrate(tinystories, calib.load_recipe("int8-w8a8-static"), calibration_data, batch_size=8,
                        progress=False)
    assert torch.equal(tinystories.model.layers[0].input_layernorm.weight, before)
    assert no_hooks_left(tinystories)


# --- NaN / Inf in a targeted weight ---------------------------------------------

def test_nan_weight_is_named_with_its_count_in_a_weight_only_recipe(tinystories):
    with torch.no_grad():
        tinystories.model.layers[1].mlp.up_proj.weight[5] = float("nan")
    with pytest.raises(CalibInputError) as info:
        calib.quantize(tinystories, calib.load_recipe("int4-w4a16"))
    message = str(info.value)
    assert message.startswith("model.layers.1.mlp.up_proj.weight holds 64 non-finite values (64 NaN, 0 Inf) "
                              "of 12288")


def test_inf_weight_in_a_fused_group_names_its_own_layer(tinystories):
    """FP8 per-tensor weights share one scale per fused group: the shard with the Inf is named."""
    with torch.no_grad():
        tinystories.model.layers[3].mlp.gate_proj.weight[0, 7] = float("-inf")
    recipe = calib.parse_recipe("name: fp8-w8a16-tensor\nweights: {type: float, strategy: tensor}\n")
    with pytest.raises(CalibInputError) as info:
        calib.quantize(tinystories, recipe)
    assert str(info.value).startswith("model.layers.3.mlp.gate_proj.weight holds 1 non-finite value (0 NaN, 1 Inf)")


def test_finite_model_still_quantizes(tinystories, calibration_data):
    recipe = calib.load_recipe("fp8-static")
    cal = calib.calibrate(tinystories, recipe, calibration_data, batch_size=8, progress=False)
    state = calib.quantize(tinystories, recipe, cal)
    assert state["model.layers.1.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert float(state["model.layers.1.mlp.down_proj.input_scale"]) > 0
    assert no_hooks_left(tinystories)
