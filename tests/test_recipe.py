"""Recipes: the bundled schemes, their compressed-tensors serialization, and
the error a user sees for each kind of wrong recipe (file, field path, what is
allowed)."""

from __future__ import annotations

import textwrap

import pytest
from compressed_tensors.quantization import QuantizationConfig

from calib.errors import RecipeError
from calib.recipe import Recipe, bundled_recipes, load_recipe, parse_recipe

# name -> (format, weights (type, strategy, dynamic), input activations or None, has kv_cache)
BUNDLED = {
    "fp8-static": ("float-quantized", ("float", "tensor", False), ("float", "tensor", False), False),
    "fp8-dynamic": ("float-quantized", ("float", "channel", False), ("float", "token", True), False),
    "fp8-static-kv": ("float-quantized", ("float", "tensor", False), ("float", "tensor", False), True),
    "int8-w8a8-dynamic": ("int-quantized", ("int", "channel", False), ("int", "token", True), False),
    "int8-w8a8-static": ("int-quantized", ("int", "channel", False), ("int", "tensor", False), False),
    "int8-w8a16": ("pack-quantized", ("int", "channel", False), None, False),
    "int4-w4a16": ("pack-quantized", ("int", "group", False), None, False),
    "fp8-static-gptq": ("float-quantized", ("float", "tensor", False), ("float", "tensor", False), False),
    "int8-w8a8-gptq": ("int-quantized", ("int", "channel", False), ("int", "token", True), False),
    "int4-w4a16-gptq": ("pack-quantized", ("int", "group", False), None, False),
}
KV_KEYS = {"num_bits", "type", "symmetric", "strategy", "dynamic", "group_size", "block_structure",
           "actorder", "observer", "observer_kwargs"}


def scheme(args) -> tuple | None:
    return None if args is None else (args.type, args.strategy, args.dynamic)


def write_recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def recipe_error(path) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return str(info.value)


# --- bundled recipes ---------------------------------------------------------

def test_bundled_recipes_are_exactly_the_documented_schemes():
    assert sorted(bundled_recipes()) == sorted(BUNDLED)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_recipe_loads_by_name_with_its_format_and_scheme(name):
    fmt, weights, activations, has_kv = BUNDLED[name]
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.format == fmt
    assert scheme(recipe.weights) == weights
    assert scheme(recipe.input_activations) == activations
    assert (recipe.kv_cache is not None) == has_kv
    assert recipe.weights.num_bits == (4 if name.startswith("int4") else 8) and recipe.weights.symmetric
    assert recipe.targets == ["Linear"] and recipe.ignore == ["lm_head"]
    assert (recipe.gptq is not None) == name.endswith("-gptq")


@pytest.mark.parametrize("name,needs", [
    ("fp8-static", True), ("fp8-static-kv", True), ("int8-w8a8-static", True),
    ("fp8-dynamic", False), ("int8-w8a8-dynamic", False), ("int8-w8a16", False), ("int4-w4a16", False),
    ("int8-w8a8-gptq", True), ("int4-w4a16-gptq", True), ("fp8-static-gptq", True),
])
def test_only_static_activation_kv_or_gptq_recipes_need_calibration_data(name, needs):
    assert load_recipe(name).needs_calibration is needs


def test_minimal_recipe_gets_linear_targets_lm_head_ignored_and_calibration_defaults(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "weights: {type: int, strategy: channel}\n"))
    assert recipe.targets == ["Linear"]
    assert recipe.ignore == ["lm_head"]
    assert recipe.input_activations is None and recipe.kv_cache is None
    assert (recipe.calibration.num_samples, recipe.calibration.seq_len, recipe.calibration.batch_size) \
        == (256, 512, 8)
    assert recipe.format == "pack-quantized"  # INT weight-only is served packed (vLLM WNA16)


def test_fp8_weight_only_is_naive_quantized(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, "weights: {type: float, strategy: channel}\n"))
    assert recipe.format == "naive-quantized"


# --- compressed-tensors serialization ----------------------------------------

@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_quantization_config_is_accepted_by_compressed_tensors_with_our_values(name):
    recipe = load_recipe(name)
    parsed = QuantizationConfig.model_validate(recipe.to_quantization_config())
    assert parsed.quant_method == "compressed-tensors"
    assert parsed.format == recipe.format
    assert parsed.ignore == ["lm_head"]
    assert list(parsed.config_groups) == ["group_0"]
    group = parsed.config_groups["group_0"]
    assert group.targets == ["Linear"]
    for theirs, ours in [(group.weights, recipe.weights), (group.input_activations, recipe.input_activations),
                         (parsed.kv_cache_scheme, recipe.kv_cache)]:
        if ours is None:
            assert theirs is None
            continue
        assert (theirs.num_bits, theirs.type, theirs.strategy, theirs.dynamic, theirs.symmetric) == \
            (ours.num_bits, ours.type, ours.strategy, ours.dynamic, ours.symmetric)
        assert theirs.observer == (None if ours.dynamic else ours.observer)
        assert theirs.observer_kwargs == ours.observer_kwargs


def test_observer_and_its_kwargs_reach_config_json(tmp_path):
    group = load_recipe("int8-w8a8-static").to_quantization_config()["config_groups"]["group_0"]
    assert group["input_activations"]["observer"] == "minmax"
    path = write_recipe(tmp_path, "weights: {type: int, strategy: channel}\n"
                                  "input_activations: {type: int, strategy: tensor, observer: percentile,\n"
                                  "                    observer_kwargs: {percentile: 99.99}}\n")
    group = load_recipe(path).to_quantization_config()["config_groups"]["group_0"]
    assert group["input_activations"]["observer"] == "percentile"
    assert group["input_activations"]["observer_kwargs"] == {"percentile": 99.99}


def test_kv_cache_scheme_writes_every_key_for_fp8_static_kv():
    kv = load_recipe("fp8-static-kv").to_quantization_config()["kv_cache_scheme"]
    assert set(kv) == KV_KEYS
    assert kv == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
                  "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
                  "observer_kwargs": {}}


@pytest.mark.parametrize("name", sorted(n for n in BUNDLED if n != "fp8-static-kv"))
def test_kv_cache_scheme_is_none_without_a_kv_cache(name):
    assert load_recipe(name).to_quantization_config()["kv_cache_scheme"] is None


def test_ignore_argument_replaces_the_recipe_ignore_list_in_config():
    config = load_recipe("fp8-static").to_quantization_config(ignore=["lm_head", "model.layers.0.mlp.down_proj"])
    assert config["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj"]
    assert QuantizationConfig.model_validate(config).ignore == ["lm_head", "model.layers.0.mlp.down_proj"]


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_quantization_config_round_trips_to_the_same_scheme(name):
    recipe = load_recipe(name)
    back = Recipe.from_quantization_config(recipe.to_quantization_config())
    assert back.weights == recipe.weights
    assert back.input_activations == recipe.input_activations
    assert back.kv_cache == recipe.kv_cache
    assert back.targets == recipe.targets
    assert back.ignore == recipe.ignore


def test_dynamic_activations_refuse_observer_settings():
    with pytest.raises(RecipeError, match="input_activations.observer: dynamic scales are computed at run time"):
        parse_recipe(textwrap.dedent("""
            weights: {type: int, strategy: channel}
            input_activations: {type: int, strategy: token, dynamic: true,
                                observer: percentile, observer_kwargs: {percentile: 99.9}}
        """))


# --- error messages: file, field path, what is allowed ------------------------

def test_literal_out_of_range_names_field_value_and_allowed_values(tmp_path):
    path = write_recipe(tmp_path, "weights: {num_bits: 7, type: int, strategy: channel}\n")
    message = recipe_error(path)
    assert str(path) in message
    assert "weights.num_bits: 7 is not one of 4, 8" in message


def test_literal_strategy_error_lists_every_strategy(tmp_path):
    path = write_recipe(tmp_path, "weights: {type: int, strategy: row}\n")
    message = recipe_error(path)
    assert "weights.strategy: 'row' is not one of 'tensor', 'channel', 'group', 'token'" in message


@pytest.mark.parametrize("text,field", [
    ("colour: red\nweights: {type: int, strategy: channel}\n", "colour"),
    ("weights: {bitz: 8, type: int, strategy: channel}\n", "weights.bitz"),
    ("weights: {type: int, strategy: channel}\ncalibration: {samples: 8}\n", "calibration.samples"),
])
def test_unknown_key_is_named_with_its_path(tmp_path, text, field):
    path = write_recipe(tmp_path, text)
    message = recipe_error(path)
    assert str(path) in message
    assert f"{field}: unknown key" in message


def test_missing_weights_is_reported_as_required(tmp_path):
    path = write_recipe(tmp_path, "name: no-weights\ntargets: [Linear]\n")
    message = recipe_error(path)
    assert str(path) in message
    assert "weights: required field is missing" in message


def test_invalid_yaml_names_the_file_and_the_line(tmp_path):
    path = write_recipe(tmp_path, "weights: [8, float\nname: broken\n")
    message = recipe_error(path)
    assert message.startswith(f"{path}: not valid YAML")
    assert "line 2" in message


def test_yaml_list_is_not_a_recipe(tmp_path):
    path = write_recipe(tmp_path, "- weights\n- input_activations\n")
    message = recipe_error(path)
    assert message == f"{path}: a recipe is a YAML mapping of fields, got list"


def test_empty_recipe_file_says_it_is_empty(tmp_path):
    path = write_recipe(tmp_path, "")
    message = recipe_error(path)
    assert "NoneType" not in message
    assert "empty" in message


def test_fp8_with_four_bits_says_float_means_fp8(tmp_path):
    path = write_recipe(tmp_path, "weights: {num_bits: 4, type: float, strategy: channel}\n")
    message = recipe_error(path)
    assert str(path) in message
    assert "weights.num_bits: type float means FP8 (E4M3): num_bits must be 8" in message


def test_static_token_activations_ask_for_dynamic(tmp_path):
    path = write_recipe(tmp_path, """
        weights: {type: float, strategy: channel}
        input_activations: {type: float, strategy: token, dynamic: false}
    """)
    message = recipe_error(path)
    assert str(path) in message
    assert "input_activations.strategy: token scales exist only at run time: set dynamic: true" in message


def test_dynamic_weights_are_rejected(tmp_path):
    path = write_recipe(tmp_path, "weights: {type: int, strategy: channel, dynamic: true}\n")
    message = recipe_error(path)
    assert str(path) in message
    assert "weights.dynamic: weights are quantized offline: dynamic must be false" in message


def test_fp8_weights_with_int8_activations_are_rejected(tmp_path):
    path = write_recipe(tmp_path, """
        weights: {type: float, strategy: tensor}
        input_activations: {type: int, strategy: tensor}
    """)
    message = recipe_error(path)
    assert str(path) in message
    assert "input_activations.type: int8 activations with float8 weights" in message
    assert "use the same type and num_bits" in message


def test_asymmetric_weights_with_activations_are_rejected(tmp_path):
    path = write_recipe(tmp_path, """
        weights: {type: int, strategy: channel, symmetric: false}
        input_activations: {type: int, strategy: token, dynamic: true}
    """)
    message = recipe_error(path)
    assert str(path) in message
    assert "weights.symmetric: W8A8 kernels need symmetric weights: set symmetric: true" in message


def test_group_strategy_without_group_size_asks_for_one(tmp_path):
    path = write_recipe(tmp_path, "weights: {type: int, strategy: group}\n")
    message = recipe_error(path)
    assert str(path) in message
    assert "weights.group_size: strategy group needs a group_size (e.g. 128)" in message


def test_invalid_regex_in_ignore_is_named(tmp_path):
    path = write_recipe(tmp_path, """
        ignore: [lm_head, "re:model.layers.(0|1.mlp"]
        weights: {type: int, strategy: channel}
    """)
    message = recipe_error(path)
    assert str(path) in message
    assert "ignore: 're:model.layers.(0|1.mlp' is not a valid regular expression" in message
    assert "missing )" in message


@pytest.mark.parametrize("kv", [
    "{type: int, strategy: tensor}",
    "{type: float, strategy: channel}",
    "{type: float, strategy: tensor, dynamic: true}",
])
def test_kv_cache_other_than_fp8_per_tensor_static_is_rejected(tmp_path, kv):
    path = write_recipe(tmp_path, f"""
        weights: {{type: float, strategy: tensor}}
        input_activations: {{type: float, strategy: tensor}}
        kv_cache: {kv}
    """)
    message = recipe_error(path)
    assert str(path) in message
    assert "kv_cache: serving stacks read FP8 per-tensor static KV scales only: type float, num_bits 8, " \
           "strategy tensor, symmetric true, dynamic false" in message


def test_unknown_observer_kwargs_key_lists_the_allowed_keys(tmp_path):
    path = write_recipe(tmp_path, """
        weights: {type: int, strategy: channel}
        input_activations: {type: int, strategy: tensor, observer: percentile, observer_kwargs: {pct: 99.9}}
    """)
    message = recipe_error(path)
    assert str(path) in message
    assert ("input_activations.observer_kwargs: unknown key(s) ['pct'] for observer percentile "
            "(allowed: ['bins', 'percentile'])") in message


def test_unknown_bundled_name_lists_the_bundled_recipes():
    message = recipe_error("fp8-statik")
    assert "'fp8-statik' is neither a file nor a bundled recipe" in message
    for name in BUNDLED:
        assert name in message


def test_int4_weights_are_weight_only(tmp_path):
    path = write_recipe(tmp_path, "weights: {num_bits: 4, type: int, strategy: group, group_size: 128}\n"
                                  "input_activations: {num_bits: 4, type: int, strategy: token, dynamic: true}\n")
    message = recipe_error(path)
    assert str(path) in message
    assert "weights.num_bits: 4-bit weights are INT4 weight-only" in message


def test_int4_weights_need_channel_or_group_scales(tmp_path):
    path = write_recipe(tmp_path, "weights: {num_bits: 4, type: int, strategy: tensor}\n")
    assert "weights.strategy: INT4 weights need channel or group scales" in recipe_error(path)


def test_smoothquant_needs_quantized_activations(tmp_path):
    path = write_recipe(tmp_path, "weights: {type: int, strategy: channel}\nsmoothquant: {alpha: 0.5}\n")
    assert "smoothquant: it flattens activation ranges for quantized activations" in recipe_error(path)


def test_smoothquant_alpha_must_be_between_0_and_1(tmp_path):
    path = write_recipe(tmp_path, "weights: {type: int, strategy: channel}\n"
                                  "input_activations: {type: int, strategy: tensor}\nsmoothquant: {alpha: 1.5}\n")
    assert "smoothquant.alpha: Input should be greater than 0 and less than 1" in recipe_error(path)


@pytest.mark.parametrize("body, message", [
    ("{alpha: auto}", "smoothquant.alpha: give a number between 0 and 1, or 'search'"),
    ("{alpha: search, grid: []}", "smoothquant.grid: give at least one alpha to try"),
    ("{alpha: search, grid: [0.5, 1.2]}", "smoothquant.grid: every alpha must be between 0 and 1"),
    ("{alpha: 0.5, grid: [0.5, 0.8]}", "grid: the alphas to try when alpha is 'search'; alpha is 0.5"),
    ("{alpha: 0.5, search: full}", "search: how the alphas of the grid are tried when alpha is 'search'"),
    ("{alpha: search, search: all}", "smoothquant.search: 'all' is not one of 'descend', 'full'"),
])
def test_smoothquant_alpha_search_fields_are_checked(tmp_path, body, message):
    path = write_recipe(tmp_path, "weights: {type: int, strategy: channel}\n"
                                  f"input_activations: {{type: int, strategy: tensor}}\nsmoothquant: {body}\n")
    assert message in recipe_error(path)


def test_smoothquant_alpha_search_round_trips(tmp_path):
    path = write_recipe(tmp_path, "weights: {type: int, strategy: channel}\n"
                                  "input_activations: {type: int, strategy: tensor}\n"
                                  "smoothquant: {alpha: search, grid: [0.6, 0.8], search: full}\n")
    recipe = load_recipe(str(path))
    assert recipe.smoothquant.searched and recipe.smoothquant.grid == [0.6, 0.8]
    assert not recipe.smoothquant.descends and load_recipe("int8-w8a8-gptq").smoothquant.descends
    again = parse_recipe(recipe.to_yaml())
    assert again.smoothquant == recipe.smoothquant


def test_int8_static_recipe_uses_smoothquant():
    recipe = load_recipe("int8-w8a8-static")
    assert recipe.smoothquant is not None and recipe.smoothquant.alpha == 0.8
    assert recipe.needs_calibration
    assert load_recipe("int8-w8a8-gptq").smoothquant.searched  # README: measured per recipe


# --- schemes that vLLM 0.33 / SGLang 0.5.23 cannot run ------------------------

def test_int8_dynamic_per_tensor_activations_are_refused(tmp_path):
    path = write_recipe(tmp_path, """
        weights: {type: int, strategy: channel}
        input_activations: {type: int, strategy: tensor, dynamic: true}
    """)
    message = recipe_error(path)
    assert str(path) in message
    assert "input_activations.strategy: INT8 dynamic activations are per token in vLLM and SGLang" in message
    assert "use strategy: token" in message


def test_fp8_dynamic_per_tensor_activations_stay_allowed(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, """
        weights: {type: float, strategy: channel}
        input_activations: {type: float, strategy: tensor, dynamic: true}
    """))
    assert (recipe.input_activations.strategy, recipe.input_activations.dynamic) == ("tensor", True)


@pytest.mark.parametrize("activations", [
    "{type: int, strategy: tensor}",
    "{type: int, strategy: token, dynamic: true}",
])
def test_int8_per_tensor_weights_with_activations_are_refused(tmp_path, activations):
    path = write_recipe(tmp_path, f"""
        weights: {{type: int, strategy: tensor}}
        input_activations: {activations}
    """)
    message = recipe_error(path)
    assert str(path) in message
    assert "weights.strategy: INT8 per-tensor weights with quantized activations" in message
    assert "use strategy: channel" in message


def test_fp8_per_tensor_weights_with_activations_stay_allowed():
    assert load_recipe("fp8-static").weights.strategy == "tensor"


# --- observer_kwargs out of range or of the wrong type -------------------------

PCT = "input_activations: {{type: int, strategy: tensor, observer: percentile, observer_kwargs: {{{}}}}}\n"
MSE = "input_activations: {{type: int, strategy: tensor, observer: mse, observer_kwargs: {{{}}}}}\n"


@pytest.mark.parametrize("template, kwargs, expected", [
    (PCT, "bins: 1000", "observer_kwargs.bins: 1000 must be a power of two from 16 to 65536"),
    (PCT, "bins: 8", "observer_kwargs.bins: 8 must be a power of two from 16 to 65536"),
    (PCT, "bins: 131072", "observer_kwargs.bins: 131072 must be a power of two from 16 to 65536"),
    (PCT, "bins: '2048'", "observer_kwargs.bins: '2048' must be a power of two from 16 to 65536"),
    (PCT, "bins: 2048.0", "observer_kwargs.bins: 2048.0 must be a power of two from 16 to 65536"),
    (MSE, "bins: true", "observer_kwargs.bins: True must be a power of two from 16 to 65536"),
    (MSE, "norm: 3", "observer_kwargs.norm: 3 is not supported for activations: their mse observer minimises "
                     "the squared error over a histogram (norm 2)"),
    (MSE, "norm: L2", "observer_kwargs.norm: 'L2' must be a number from 1 to 8"),
    (MSE, "norm: 0.5", "observer_kwargs.norm: 0.5 must be a number from 1 to 8"),
    (MSE, "grid: 0", "observer_kwargs.grid: 0 must be a whole number from 2 to 1000"),
    (MSE, "grid: 100000", "observer_kwargs.grid: 100000 must be a whole number from 2 to 1000"),
    (MSE, "grid: 2.5", "observer_kwargs.grid: 2.5 must be a whole number from 2 to 1000"),
    (PCT, "percentile: high", "observer_kwargs.percentile: 'high' must be a number in (50, 100]"),
    (PCT, "percentile: .nan", "observer_kwargs.percentile: nan must be a number in (50, 100]"),
    (PCT, "percentile: true", "observer_kwargs.percentile: True must be a number in (50, 100]"),
])
def test_observer_kwargs_out_of_range_name_the_field(tmp_path, template, kwargs, expected):
    path = write_recipe(tmp_path, "weights: {type: int, strategy: channel}\n" + template.format(kwargs))
    message = recipe_error(path)
    assert str(path) in message
    assert f"input_activations.{expected}" in message


def test_observer_kwargs_in_range_are_accepted_and_build_observers(tmp_path):
    from calib.observers import make_observer

    for template, kwargs in ((PCT, "percentile: 99.9, bins: 65536"), (MSE, "bins: 16, grid: 1000, norm: 2"),
                             (MSE, "grid: 2, norm: 2.0")):
        recipe = load_recipe(write_recipe(tmp_path, "weights: {type: int, strategy: channel}\n"
                                          + template.format(kwargs)))
        acts = recipe.input_activations
        observer = make_observer(acts.observer, acts.observer_kwargs)
        assert observer.bins == acts.observer_kwargs.get("bins", 2048)


def test_weight_clip_search_norm_and_grid_reach_the_search(tmp_path):
    """weights.observer_kwargs {norm, grid} drive the MSE clip search: each group's clip is the
    candidate with the least sum |error|^norm (brute force over the same candidates)."""
    import torch

    from calib import qmath
    from calib.quantize import weight_amax

    recipe = load_recipe(write_recipe(tmp_path, "weights: {num_bits: 4, type: int, strategy: group, group_size: 8, "
                                      "observer: mse, observer_kwargs: {norm: 3, grid: 25}}\n"))
    assert recipe.weights.observer_kwargs == {"norm": 3, "grid": 25}
    torch.manual_seed(0)
    w = torch.randn(6, 16) * torch.tensor([1.0] * 15 + [6.0])  # one outlier column
    got = weight_amax(w, recipe.weights).reshape(-1)
    rows = w.reshape(-1, 8)
    amax = rows.abs().amax(dim=1)
    for r, (row, top, clip) in enumerate(zip(rows, amax, got)):
        errors = []
        for p in torch.linspace(0.5, 1.0, 25):
            scale = qmath.symmetric_scale(top * p, 7.0)
            q = qmath.quantize_int(row, scale, qmin=-8, qmax=7)
            errors.append((float(((q.float() * scale - row).abs() ** 3).sum()), float(top * p)))
        assert float(clip) == pytest.approx(min(errors)[1], rel=1e-6), r
    squared = weight_amax(w, recipe.weights.model_copy(update={"observer_kwargs": {"norm": 2, "grid": 25}}))
    eighth = weight_amax(w, recipe.weights.model_copy(update={"observer_kwargs": {"norm": 8, "grid": 25}}))
    assert not torch.equal(eighth, squared)  # the norm changes the choice


# --- fused_scale: FP8 per-tensor weights only ------------------------------------

@pytest.mark.parametrize("weights, activations, expected", [
    ("{type: int, strategy: channel, fused_scale: per_shard}", "",
     "weights.fused_scale: only FP8 per-tensor weights choose between one scale per fused group and one per "
     "shard (these are int8 per channel"),
    ("{type: float, strategy: channel, fused_scale: per_shard}", "",
     "weights.fused_scale: only FP8 per-tensor weights choose"),
    ("{type: float, strategy: tensor}", "input_activations: {type: float, strategy: tensor, fused_scale: per_shard}",
     "input_activations.fused_scale: a weights field"),
    ("{type: float, strategy: tensor, fused_scale: largest}", "", "weights.fused_scale"),
])
def test_fused_scale_misuse_names_the_field(tmp_path, weights, activations, expected):
    path = write_recipe(tmp_path, f"weights: {weights}\n{activations}\n")
    message = recipe_error(path)
    assert str(path) in message
    assert expected in message


def test_fused_scale_defaults_to_shared_and_stays_out_of_config_json(tmp_path):
    from calib.quantize import shares_fused_scale

    assert load_recipe("fp8-static").weights.fused_scale == "shared"
    recipe = load_recipe(write_recipe(tmp_path, "weights: {type: float, strategy: tensor, fused_scale: per_shard}\n"))
    assert not shares_fused_scale(recipe.weights) and shares_fused_scale(load_recipe("fp8-static").weights)
    assert "fused_scale" not in recipe.weights.to_compressed_tensors()
    # a recipe as calib dumps it (provenance, report) names fused_scale for every role and parses back
    import yaml

    dumped = yaml.safe_dump(load_recipe("fp8-static-kv").model_dump(mode="json"))
    assert "fused_scale" in dumped and parse_recipe(dumped) == load_recipe("fp8-static-kv")


# --- recipe text: encoding, size, alias bombs -----------------------------------

def test_non_utf8_recipe_file_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\u00e9\nweights: {type: int, strategy: channel}\n".encode("latin-1"))
    message = recipe_error(path)
    assert message.startswith(f"{path}: not UTF-8 text (byte 0xe9 at offset 9)")
    assert "save the recipe as UTF-8" in message


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfname: bom\nweights: {type: int, strategy: channel}\n")
    assert load_recipe(path).name == "bom"


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\nweights: *l{levels - 1}\ninput_activations: {{type: *l{levels - 1}}}\n"


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    import time

    path = write_recipe(tmp_path, alias_bomb())
    start = time.perf_counter()
    message = recipe_error(path)
    assert time.perf_counter() - start < 2.0
    assert len(message) < 2000
    assert message.startswith(f"{path}: the YAML expands to more than 10000 values")


def test_recursive_yaml_alias_is_refused(tmp_path):
    path = write_recipe(tmp_path, "weights: &w [*w]\n")
    assert recipe_error(path).startswith(f"{path}: the YAML expands to more than 10000 values")


def test_small_nested_aliases_still_get_short_error_values(tmp_path):
    """Under the expansion limit a large value is still shown capped."""
    path = write_recipe(tmp_path, alias_bomb(levels=3, width=9))  # 3 x 9^3 scalars: under the limit
    message = recipe_error(path)
    assert len(message) < 2000
    assert "weights: Input should be a valid dictionary" in message
    assert "\u2026" in message or "..." in message


def test_huge_scalar_value_is_shown_capped(tmp_path):
    path = write_recipe(tmp_path, f"weights: {{type: int, strategy: {'x' * 100_000}}}\n")
    message = recipe_error(path)
    assert "weights.strategy: 'xxx" in message and "is not one of 'tensor', 'channel', 'group', 'token'" in message
    assert len(message) < 2000


def test_deeply_nested_yaml_is_a_recipe_error(tmp_path):
    path = write_recipe(tmp_path, "weights: " + "[" * 5000 + "]" * 5000 + "\n")
    message = recipe_error(path)
    assert str(path) in message and len(message) < 2000


def test_recipe_file_larger_than_a_recipe_is_refused(tmp_path):
    path = write_recipe(tmp_path, "weights: {type: int, strategy: channel}\n" + "# padding\n" * 200_000)
    assert recipe_error(path).startswith(f"{path}: a recipe is a small YAML file; this one is 2000040 bytes")


def test_a_quantization_config_from_llm_compressor_reads_back():
    """llm-compressor 0.14's fp8-static config.json (as written on SmolLM2): its own observer names are calibration
    metadata a reader does not need, so calib eval / inspect read the checkpoint instead of refusing it."""
    args = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
            "observer_kwargs": {}, "scale_dtype": None, "strategy": "tensor", "symmetric": True, "type": "float",
            "zp_dtype": None}
    config = {"config_groups": {"group_0": {
        "format": "float-quantized", "output_activations": None, "targets": ["Linear"],
        "input_activations": {**args, "observer": "static_minmax"},
        "weights": {**args, "observer": "memoryless_minmax"}}},
        "format": "float-quantized", "global_compression_ratio": None, "ignore": ["lm_head"], "kv_cache_scheme": None,
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {}, "version": "0.19.0"}
    recipe = Recipe.from_quantization_config(config)
    assert recipe.weights.is_fp8 and recipe.weights.strategy == "tensor" and recipe.input_activations.dynamic is False
    assert recipe.ignore == ["lm_head"] and recipe.weights.observer == "minmax"  # the default: ours is not claimed
    ours = load_recipe("fp8-static").model_copy(update={"input_activations": load_recipe("fp8-static")
                                                        .input_activations.model_copy(update={"observer": "mse"})})
    assert Recipe.from_quantization_config(ours.to_quantization_config()).input_activations.observer == "mse"
