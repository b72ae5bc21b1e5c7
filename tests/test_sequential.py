"""Sequential calibration: one layer's weights at a time, the same observers as
whole-model calibration, bit for bit."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn

import calib
from calib.calibration import Calibration, calibrate
from calib.data import CalibrationSet
from calib.errors import CalibInputError
from calib.estimate import RUNTIME_OVERHEAD
from calib.layers import find_decoder_layers, largest_layer_bytes
from calib.recipe import SmoothQuantArgs
from calib.sequential import (SPILL_PREFIX, SequentialCalibration, apply_transforms, calibrate_sequential,
                              estimate_sequential_peak, sequential_memory)
from conftest import SHAKESPEARE, TINYSTORIES, TINYSTORIES_TEXT

# --------------------------------------------------------------------------- helpers


def skeleton(config, auto=transformers.AutoModelForCausalLM) -> nn.Module:
    with torch.device("meta"):
        return auto.from_config(config)


def safetensors_loader(folder: Path, log: list | None = None):
    """``load_weights`` over a model folder whose tensor names are the module names."""
    path = str(folder / "model.safetensors")

    def load(names: list[str]) -> dict[str, torch.Tensor]:
        if log is not None:
            log.append(list(names))
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
            return {n: f.get_tensor(n) for n in names if n in keys}

    return load


def dict_loader(state: dict[str, torch.Tensor]):
    return lambda names: {n: state[n].clone() for n in names if n in state}


def text_samples(folder: Path, count: int = 23, longest: int = 96) -> CalibrationSet:
    """Paragraphs of TinyStories, one per sample, of different lengths: batches carry padding."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    paragraphs = [p for p in TINYSTORIES_TEXT.read_text(encoding="utf-8")[:100_000].split("\n\n") if p.strip()]
    samples = [torch.tensor(tok(p)["input_ids"][:longest], dtype=torch.long) for p in paragraphs[:count]]
    return CalibrationSet(samples=samples, source="tinystories paragraphs", seq_len=longest, packed=False, seed=0)


def packed_samples(folder: Path, count: int = 20, width: int = 64) -> CalibrationSet:
    """Equal windows of the token stream (the default for causal LMs): no padding, no mask tensor."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    ids = torch.tensor(tok(TINYSTORIES_TEXT.read_text(encoding="utf-8")[:60_000])["input_ids"][:count * width])
    return CalibrationSet(samples=list(ids.reshape(count, width)), source="tinystories", seq_len=width, packed=True,
                          seed=0)


def random_samples(vocab: int, count: int = 11, seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(5, 40, (count,), generator=g)]
    samples = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    return CalibrationSet(samples=samples, source="random ids", seq_len=40, packed=False, seed=seed)


def assert_same_observers(whole: Calibration, seq: Calibration) -> None:
    """Identical running state, bit for bit: min/max, counts, histograms; KV too."""
    assert list(seq.input_observers) == list(whole.input_observers)
    for name, a in whole.input_observers.items():
        b = seq.input_observers[name]
        assert a.count == b.count, name
        assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val), name
        if hasattr(a, "hist"):
            assert a.edge == b.edge and torch.equal(a.hist, b.hist), name
    assert list(seq.kv_observers) == list(whole.kv_observers)
    for index, pair in whole.kv_observers.items():
        for a, b in zip(pair, seq.kv_observers[index]):
            assert a.count == b.count and torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)
    assert (seq.batches, seq.tokens, seq.smoothed) == (whole.batches, whole.tokens, whole.smoothed)


def all_meta(model: nn.Module) -> bool:
    return all(p.is_meta for p in model.parameters())


@pytest.fixture(scope="module")
def stories_data() -> CalibrationSet:
    return text_samples(TINYSTORIES)


# --------------------------------------------------------------------------- layer walking

FAMILIES = {
    "llama": (lambda c: transformers.LlamaConfig(num_key_value_heads=2, **c), "model.layers"),
    "mistral": (lambda c: transformers.MistralConfig(num_key_value_heads=2, **c), "model.layers"),
    "qwen2": (lambda c: transformers.Qwen2Config(num_key_value_heads=2, **c), "model.layers"),
    "gemma": (lambda c: transformers.GemmaConfig(num_key_value_heads=2, head_dim=16, **c), "model.layers"),
    "phi3": (lambda c: transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, **c), "model.layers"),
    "opt": (lambda c: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                             vocab_size=300, max_position_embeddings=128, word_embed_proj_dim=32),
            "model.decoder.layers"),
    "gpt_neox": (lambda c: transformers.GPTNeoXConfig(**c), "gpt_neox.layers"),
    "bert": (lambda c: transformers.BertConfig(**c), "encoder.layer"),
}
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
              max_position_embeddings=128)


def family(name: str):
    make, path = FAMILIES[name]
    auto = transformers.AutoModel if name == "bert" else transformers.AutoModelForCausalLM
    return make(dict(COMMON)), auto, path


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_find_decoder_layers_on_family_skeletons(name):
    config, auto, path = family(name)
    model = skeleton(config, auto)
    layout = find_decoder_layers(model)
    before, layers, after = layout
    assert layout.path == path and len(layers) == 2 and layers is model.get_submodule(path)
    embeddings = model.get_input_embeddings()
    assert any(m is embeddings for m in before.values())  # the input side comes first
    assert not set(before) & set(after)
    if name != "bert":
        assert any(m is model.get_output_embeddings() for m in after.values())
    assert layout.layer_of(f"{path}.1.mlp.up_proj") == 1 and layout.layer_of("lm_head") is None


def test_ambiguous_models_are_refused_by_name():
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100, d_kv=16)
    with pytest.raises(CalibInputError, match=r"2 ModuleLists of blocks \(encoder.block, decoder.block\).*LAYER_PATHS"):
        find_decoder_layers(skeleton(config, transformers.AutoModelForSeq2SeqLM))


def test_layer_paths_table_names_the_list_to_walk(monkeypatch):
    import calib.layers

    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100, d_kv=16)
    monkeypatch.setitem(calib.layers.LAYER_PATHS, "t5", "encoder.block")
    layout = find_decoder_layers(skeleton(config, transformers.AutoModelForSeq2SeqLM))
    assert layout.path == "encoder.block" and layout.layer_of("encoder.block.0.layer.0") == 0


# --------------------------------------------------------------------------- identity with whole-model calibration


@pytest.mark.parametrize("recipe_name", ["fp8-static", "fp8-static-kv", "int8-w8a8-static"])
def test_trained_llama_matches_whole_model_bit_for_bit(recipe_name, stories_data):
    recipe = calib.load_recipe(recipe_name)
    requested: list[list[str]] = []
    model = skeleton(transformers.AutoConfig.from_pretrained(str(TINYSTORIES)))
    loader = safetensors_loader(TINYSTORIES, requested)

    def load(names):  # whatever is asked for, nothing else is materialised at that moment
        assert all_meta(model)
        return loader(names)

    seq = calibrate_sequential(model, load, recipe, stories_data, batch_size=5, progress=False)
    whole_model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    whole = calibrate(whole_model, recipe, stories_data, batch_size=5, progress=False)

    assert isinstance(seq, SequentialCalibration) and isinstance(seq, Calibration)
    assert_same_observers(whole, seq)
    assert seq.batches == 5 and seq.tokens == stories_data.num_tokens
    if recipe_name == "fp8-static-kv":
        assert len(seq.kv_observers) == 4
    assert all_meta(model)  # everything went back
    # one unit per request: the embeddings (+ final norm), then each layer once; the ignored head never
    assert len(requested) == 5 and "lm_head.weight" not in sum(requested, [])
    assert all(n.startswith(f"model.layers.{i}.") for i, names in enumerate(requested[1:]) for n in names)


def test_smoothquant_transforms_reproduce_apply_smoothing():
    recipe = calib.load_recipe("int8-w8a8-static")
    stories_data = packed_samples(SHAKESPEARE)
    seq = calibrate_sequential(skeleton(transformers.AutoConfig.from_pretrained(str(SHAKESPEARE))),
                               safetensors_loader(SHAKESPEARE), recipe, stories_data, batch_size=8, progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(SHAKESPEARE)).eval()
    whole = calibrate(model, recipe, stories_data, batch_size=8, progress=False)
    assert_same_observers(whole, seq)
    assert seq.smoothed == 16
    # 4 layers x (norm, q, k, v; norm, gate, up; up, down; v, o); up_proj and v_proj: rows then columns
    assert len(seq.transforms) == 4 * 9
    assert [t.divide for t in seq.transforms["model.layers.1.mlp.up_proj.weight"]] == [True, False]
    assert [t.divide for t in seq.transforms["model.layers.1.self_attn.v_proj.weight"]] == [True, False]
    with safe_open(str(SHAKESPEARE / "model.safetensors"), "pt") as f:
        for name in f.keys():
            source = f.get_tensor(name)
            rescaled = apply_transforms(source, seq.transforms.get(name, []))
            assert torch.equal(rescaled, model.get_parameter(name).detach()), name


def test_bfloat16_model_matches_including_transforms(stories_data):
    """Weights cast to the skeleton's dtype on the way in, as from_pretrained(dtype=...) casts them."""
    recipe = calib.load_recipe("int8-w8a8-static")
    config = transformers.AutoConfig.from_pretrained(str(TINYSTORIES))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    seq = calibrate_sequential(model, safetensors_loader(TINYSTORIES), recipe, stories_data, batch_size=8,
                               progress=False)
    whole_model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES), dtype=torch.bfloat16).eval()
    assert_same_observers(calibrate(whole_model, recipe, stories_data, batch_size=8, progress=False), seq)
    with safe_open(str(TINYSTORIES / "model.safetensors"), "pt") as f:
        for name, transforms in seq.transforms.items():
            rescaled = apply_transforms(f.get_tensor(name).to(torch.bfloat16), transforms)
            assert torch.equal(rescaled, whole_model.get_parameter(name).detach()), name


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_histogram_observers_match(observer, stories_data):
    base = calib.load_recipe("fp8-static")
    recipe = base.model_copy(update={"input_activations": base.input_activations.model_copy(
        update={"observer": observer, "observer_kwargs": {"bins": 256}})})
    seq = calibrate_sequential(skeleton(transformers.AutoConfig.from_pretrained(str(TINYSTORIES))),
                               safetensors_loader(TINYSTORIES), recipe, stories_data, batch_size=6, progress=False)
    whole = calibrate(transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval(), recipe,
                      stories_data, batch_size=6, progress=False)
    assert_same_observers(whole, seq)
    name = "model.layers.2.mlp.down_proj"
    assert seq.input_observers[name].amax(448.0, True) == whole.input_observers[name].amax(448.0, True)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_random_init_families_match_whole_model(name):
    """Every Linear targeted, the head included (observed by the tail forward,
    with the input embeddings stubbed), KV scales where the model is a decoder."""
    config, auto, _ = family(name)
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = random_samples(config.vocab_size)
    recipes = ["fp8-static"] + ([] if name == "bert" else ["fp8-static-kv"])
    for recipe_name in recipes:
        recipe = calib.load_recipe(recipe_name).model_copy(update={"ignore": []})
        seq = calibrate_sequential(skeleton(config, auto), dict_loader(state), recipe, data, batch_size=4,
                                   progress=False)
        whole = calibrate(model, recipe, data, batch_size=4, progress=False)
        assert_same_observers(whole, seq)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        assert seq.input_observers["lm_head"].count == data.num_tokens


@pytest.mark.parametrize("name, recipe_name, alpha", [("llama", "int8-w8a8-static", 0.5),
                                                      ("qwen2", "int8-w8a8-static", 0.5),
                                                      ("llama", "int8-w8a8-dynamic", 0.5),
                                                      ("llama", "int8-w8a8-static", "search")])
def test_random_init_smoothquant_matches(name, recipe_name, alpha):
    """With dynamic activations SmoothQuant is the only stream: nothing else observed.
    A searched alpha is chosen on the same rows, so layer by layer picks the same."""
    config, auto, _ = family(name)
    torch.manual_seed(1)
    model = auto.from_config(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = random_samples(config.vocab_size, seed=1)
    recipe = calib.load_recipe(recipe_name).model_copy(update={"smoothquant": SmoothQuantArgs(alpha=alpha)})
    seq = calibrate_sequential(skeleton(config, auto), dict_loader(state), recipe, data, batch_size=3, progress=False)
    whole = calibrate(model, recipe, data, batch_size=3, progress=False)
    assert_same_observers(whole, seq)
    assert {k: c.alpha for k, c in seq.smoothing.items()} == {k: c.alpha for k, c in whole.smoothing.items()}
    assert len(seq.smoothing) == 2 * 4
    assert len(seq.transforms) == 2 * (10 if name == "qwen2" else 9)  # Qwen2's v_proj has a bias, rescaled too
    for key, transforms in seq.transforms.items():
        assert torch.equal(apply_transforms(state[key], transforms), model.get_parameter(key).detach()), key


def test_per_layer_masks_and_rotary_tables_are_each_layers_own():
    """Qwen2 with sliding-window layers and Gemma 3 (local and global rotary) pass
    different arguments to different layers: each layer gets its own."""
    common = dict(COMMON, num_hidden_layers=3)
    configs = [
        (transformers.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                                  max_window_layers=1, **common), "fp8-static-kv"),
        (transformers.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                       **common), "fp8-static-kv"),
    ]
    for config, recipe_name in configs:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        data = random_samples(config.vocab_size)
        recipe = calib.load_recipe(recipe_name)
        seq = calibrate_sequential(skeleton(config), dict_loader(state), recipe, data, batch_size=4, progress=False)
        assert_same_observers(calibrate(model, recipe, data, batch_size=4, progress=False), seq)


def test_a_loaded_model_is_walked_without_loading(stories_data):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    recipe = calib.load_recipe("fp8-static-kv")

    def no_load(names):
        raise AssertionError(f"asked to load {names[:3]}")

    seq = calibrate_sequential(model, no_load, recipe, stories_data, batch_size=5, progress=False)
    assert_same_observers(calibrate(model, recipe, stories_data, batch_size=5, progress=False), seq)
    assert not any(p.is_meta for p in model.parameters())


# --------------------------------------------------------------------------- models calib walks by their behaviour


class ToyBlock(nn.Module):
    def __init__(self, width: int, tuple_out: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.tuple_out = tuple_out

    def forward(self, hidden, attention_mask=None):
        out = hidden + torch.relu(self.proj(hidden))
        return (out, None) if self.tuple_out else out


class ToyModel(nn.Module):
    """Tuple-returning layers (as Falcon's) or a model that edits hidden states between layers."""

    def __init__(self, tuple_out: bool = False, edits_between: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(ToyBlock(16, tuple_out) for _ in range(3))
        self.head = nn.Linear(16, 50)
        self.tuple_out, self.edits_between = tuple_out, edits_between

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            out = layer(hidden, attention_mask=attention_mask)
            hidden = out[0] if self.tuple_out else out
            if self.edits_between:
                hidden = hidden * 2
        return self.head(hidden)


def test_layers_returning_tuples_are_fed_the_hidden_states():
    torch.manual_seed(0)
    model = ToyModel(tuple_out=True).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    data = random_samples(50)
    recipe = calib.load_recipe("fp8-static").model_copy(update={"ignore": []})
    with torch.device("meta"):
        meta = ToyModel(tuple_out=True)
    seq = calibrate_sequential(meta, dict_loader(state), recipe, data, batch_size=4, progress=False)
    assert_same_observers(calibrate(model, recipe, data, batch_size=4, progress=False), seq)
    assert seq.input_observers["head"].count == data.num_tokens


def test_a_model_that_edits_hidden_states_between_layers_is_refused():
    model = ToyModel(edits_between=True).eval()
    recipe = calib.load_recipe("fp8-static")
    with pytest.raises(CalibInputError, match="changes the hidden states between its layers"):
        calibrate_sequential(model, dict_loader({}), recipe, random_samples(50), batch_size=4, progress=False)


# --------------------------------------------------------------------------- memory: budget, spill, estimates


def test_spilled_hidden_states_give_the_same_result_and_leave_nothing(stories_data, tmp_path):
    config = transformers.AutoConfig.from_pretrained(str(TINYSTORIES))
    recipe = calib.load_recipe("int8-w8a8-static")  # two streams (unsmoothed + smoothed) spilled
    memory = sequential_memory(skeleton(config), stories_data, 5, recipe=recipe)
    files_seen: list[int] = []
    loader = safetensors_loader(TINYSTORIES)

    def load(names):
        files_seen.append(len(list(tmp_path.rglob("*.safetensors"))))
        return loader(names)

    spilled = calibrate_sequential(skeleton(config), load, recipe, stories_data, batch_size=5,
                                   budget_bytes=memory.minimum, spill_dir=tmp_path, progress=False)
    in_memory = calibrate_sequential(skeleton(config), loader, recipe, stories_data, batch_size=5,
                                     budget_bytes=memory.peak(spilled=False), spill_dir=tmp_path, progress=False)
    assert spilled.spilled and not in_memory.spilled
    assert_same_observers(in_memory, spilled)
    assert all(torch.equal(a.scales, b.scales) for name in in_memory.transforms
               for a, b in zip(in_memory.transforms[name], spilled.transforms[name]))
    assert max(files_seen) == 2 * 5  # 5 batches per stream were on disk while layers ran
    assert list(tmp_path.iterdir()) == []  # the spill folder is gone


def test_spill_folder_is_removed_when_calibration_fails(tmp_path):
    model = ToyModel(edits_between=True).eval()
    data = random_samples(50)
    memory = sequential_memory(model, data, 4, recipe=calib.load_recipe("fp8-static"))
    with pytest.raises(CalibInputError):
        calibrate_sequential(model, dict_loader({}), calib.load_recipe("fp8-static"), data, batch_size=4,
                             budget_bytes=memory.minimum, spill_dir=tmp_path, progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(SPILL_PREFIX)]


def test_budget_below_one_layer_and_one_batch_fails_before_any_work(stories_data):
    config = transformers.AutoConfig.from_pretrained(str(TINYSTORIES))
    memory = sequential_memory(skeleton(config), stories_data, 5)
    asked: list = []
    with pytest.raises(CalibInputError, match=r"memory budget .* is below the least sequential calibration needs"
                                              r".*the largest layer 197.1 KB.*one batch's forward"):
        calibrate_sequential(skeleton(config), safetensors_loader(TINYSTORIES, asked), calib.load_recipe("fp8-static"),
                             stories_data, batch_size=5, budget_bytes=memory.minimum - 1, spill_dir=Path("/tmp"),
                             progress=False)
    assert asked == []


def test_spilling_needs_a_folder(stories_data):
    config = transformers.AutoConfig.from_pretrained(str(TINYSTORIES))
    memory = sequential_memory(skeleton(config), stories_data, 5)
    with pytest.raises(CalibInputError, match="no folder to spill them to"):
        calibrate_sequential(skeleton(config), safetensors_loader(TINYSTORIES), calib.load_recipe("fp8-static"),
                             stories_data, batch_size=5, budget_bytes=memory.minimum, progress=False)


def test_estimates_from_the_skeleton(stories_data):
    config = transformers.AutoConfig.from_pretrained(str(TINYSTORIES))
    model = skeleton(config)
    layer = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    assert layer == 49_280 * 4  # q 64x64, k/v 64x32, o 64x64, gate/up/down 64x192, two norms
    assert largest_layer_bytes(model) == layer  # > the embeddings (512 x 64) and the head (64 x 512)
    assert largest_layer_bytes(model, torch.bfloat16) == largest_layer_bytes(model) // 2
    memory = sequential_memory(model, stories_data, 5)
    lengths = sorted((s.numel() for s in stories_data.samples), reverse=True)
    batches = [lengths[i:i + 5] for i in range(0, len(lengths), 5)]  # longest first, padded to the widest
    assert memory.hidden_bytes == sum(len(b) * b[0] * 64 * 4 for b in batches)
    peak = estimate_sequential_peak(model, stories_data, 5)
    assert peak == memory.peak(spilled=False) > memory.peak(spilled=True) > RUNTIME_OVERHEAD
    assert estimate_sequential_peak(model, stories_data, 5, recipe=calib.load_recipe("int8-w8a8-static")) == \
        peak + memory.hidden_bytes  # SmoothQuant keeps two streams


def test_progress_bar_and_a_debug_line_per_layer(stories_data, caplog, capsys):
    config = transformers.AutoConfig.from_pretrained(str(TINYSTORIES))
    with caplog.at_level(logging.DEBUG, logger="calib.sequential"):
        calibrate_sequential(skeleton(config), safetensors_loader(TINYSTORIES), calib.load_recipe("fp8-static"),
                             stories_data, batch_size=8, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("layer ")]
    assert [line.split(":")[0] for line in lines] == [f"layer {i}/4" for i in range(1, 5)]
    assert "calibrate (sequential)" in capsys.readouterr().err


def nan_in_batch_2() -> tuple[dict[str, torch.Tensor], CalibrationSet]:
    """TinyStories' weights with token 7's embedding NaN, and data where only the
    sample in batch 2 (batches of 2) holds token 7."""
    state = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).state_dict()
    state = {k: v.clone() for k, v in state.items()}
    state["model.embed_tokens.weight"][7] = float("nan")
    samples = [torch.randint(10, 500, (n,), generator=torch.Generator().manual_seed(n))
               for n in (40, 35, 30, 25, 20, 15)]
    samples[4][3] = 7  # lengths sorted 40..15, batches of 2: the fifth sample is in batch 2
    return state, CalibrationSet(samples=samples, source="ids", seq_len=40, packed=False, seed=0)


def test_nan_names_the_module_and_the_batch_like_whole_model(stories_data):
    """Token 7's embedding is NaN and only the sample in batch 2 holds it."""
    state, data = nan_in_batch_2()
    recipe = calib.load_recipe("fp8-static")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    model.load_state_dict(state)
    with pytest.raises(CalibInputError) as whole:
        calibrate(model, recipe, data, batch_size=2, progress=False)
    config = transformers.AutoConfig.from_pretrained(str(TINYSTORIES))
    with pytest.raises(CalibInputError) as seq:
        calibrate_sequential(skeleton(config), dict_loader(state), recipe, data, batch_size=2, progress=False)
    assert "model.layers.0.self_attn.q_proj received NaN input" in str(seq.value)
    assert "calibration batch 2" in str(seq.value)
    assert str(seq.value) == str(whole.value)
