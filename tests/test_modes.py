"""``calib run``'s three modes end to end: sequential (layer by layer from the
shards) writes exactly what in-memory writes, with the hidden states in memory or
spilled to disk; ``auto`` picks sequential when the model does not fit the
budget; data-free recipes never build the model; bad budgets and sources are
clear errors that leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import calib
from calib.cli import main
from calib.errors import CalibInputError
from calib.estimate import in_memory_peak_bytes
from conftest import SHAKESPEARE, TINYSTORIES, TINYSTORIES_TEXT
from test_native_names import file_tensors, raw  # read with safetensors itself, not calib's reader

SAMPLES, SEQ = 12, 64
SCALES = ("weight_scale", "input_scale", "input_zero_point", "k_scale", "v_scale")


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Same tensors (names, dtypes, bytes), same config.json and recipe.yaml."""
    ta, tb = file_tensors(a), file_tensors(b)
    assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and raw(ta[name]) == raw(tb[name]), name
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    assert (a / "recipe.yaml").read_text() == (b / "recipe.yaml").read_text()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def run(model: Path, recipe: str, out: Path, **kwargs) -> dict:
    kwargs.setdefault("dataset", str(TINYSTORIES_TEXT))
    return calib.run(model=str(model), recipe=recipe, output=out, num_samples=SAMPLES, seq_len=SEQ, batch_size=5,
                     progress=False, **kwargs)


@pytest.mark.parametrize("model", [TINYSTORIES, SHAKESPEARE], ids=["tinystories", "shakespeare"])
@pytest.mark.parametrize("recipe", ["fp8-static", "fp8-static-kv", "int8-w8a8-static"])
def test_sequential_writes_the_in_memory_checkpoint(model, recipe, tmp_path):
    whole = run(model, recipe, tmp_path / "whole", mode="in-memory")
    seq = run(model, recipe, tmp_path / "seq", mode="sequential")
    assert whole["execution"]["mode"] == "in-memory" and seq["execution"]["mode"] == "sequential"
    assert seq["sequential"]["layers"] == 4 and not seq["execution"]["hidden_states_spilled_to_disk"]
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "seq")
    for key in ("layers_quantized", "calibration_tokens", "smoothquant_pairs", "kv_scales", "num_samples"):
        assert seq[key] == whole[key], key
    assert seq["layers_quantized"] == 28
    errors = {layer["name"]: layer["output_error"] for layer in whole["layers"]}
    assert {layer["name"]: layer["output_error"] for layer in seq["layers"]} == errors  # the same sampled rows
    assert len(errors) == 28 and all(0 < e < 0.2 for e in errors.values())
    if recipe == "fp8-static-kv":
        assert len(seq["kv_scales"]) == 4


def test_spilled_hidden_states_write_the_same_checkpoint_and_leave_nothing(tmp_path):
    """A budget that fits one layer but not the hidden states: they go to disk
    inside the output's temporary folder, and the checkpoint is the same."""
    from calib.models import model_outline
    from calib.sequential import sequential_memory

    recipe = "int8-w8a8-static"  # SmoothQuant: two streams of hidden states
    whole = run(TINYSTORIES, recipe, tmp_path / "whole", mode="in-memory")
    outline = model_outline(str(TINYSTORIES))
    from calib.data import build_calibration_set

    data = build_calibration_set(outline.tokenizer, str(TINYSTORIES_TEXT), num_samples=SAMPLES, seq_len=SEQ)
    memory = sequential_memory(outline.skeleton, data, 5, torch.float32, calib.load_recipe(recipe))
    assert memory.minimum < memory.peak(spilled=False)
    seq = run(TINYSTORIES, recipe, tmp_path / "seq", mode="sequential", max_memory=memory.minimum)
    assert seq["execution"]["hidden_states_spilled_to_disk"] and seq["sequential"]["hidden_states_spilled_to_disk"]
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "seq")
    assert not [p for p in (tmp_path / "seq").rglob("*") if "spill" in p.name]
    assert leftovers(tmp_path) == []
    assert whole["calibration_tokens"] == seq["calibration_tokens"]


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A random-init Llama whose weights (~25 MB) dominate its calibration activations."""
    folder = tmp_path_factory.mktemp("wide") / "llama"
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                      max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES)).save_pretrained(folder)
    return folder


def test_auto_goes_sequential_when_the_model_does_not_fit_the_budget(wide_llama, tmp_path):
    plan = calib.dry_run(model=str(wide_llama), recipe="fp8-static", dataset=str(TINYSTORIES_TEXT),
                         num_samples=SAMPLES, seq_len=SEQ, batch_size=5)
    peak = plan["memory"]["in_memory_peak_estimate_bytes"]
    assert plan["mode"] == "in-memory" and peak > in_memory_peak_bytes(25 * 10**6, 0)
    budget = peak - 10 * 10**6  # the weights no longer fit; one layer (~4 MB) and the hidden states do
    plan = calib.dry_run(model=str(wide_llama), recipe="fp8-static", dataset=str(TINYSTORIES_TEXT),
                         num_samples=SAMPLES, seq_len=SEQ, batch_size=5, max_memory=str(budget))
    assert plan["mode"] == "sequential" and "exceeds the budget" in plan["mode_reason"]
    assert plan["memory"]["sequential_peak_estimate_bytes"] < budget

    report = run(wide_llama, "fp8-static", tmp_path / "auto", max_memory=budget)
    assert report["execution"]["mode"] == "sequential" and report["execution"]["requested"] == "auto"
    assert report["execution"]["in_memory_peak_estimate_bytes"] == peak
    run(wide_llama, "fp8-static", tmp_path / "whole", mode="in-memory")
    assert_same_checkpoint(tmp_path / "auto", tmp_path / "whole")
    saved = json.loads((tmp_path / "auto" / "calib_report.json").read_text())
    assert saved["execution"]["mode"] == "sequential" and saved["execution"]["budget_bytes"] == budget


def test_a_budget_below_one_layer_is_an_error_before_any_work(wide_llama, tmp_path):
    with pytest.raises(CalibInputError, match="below the least sequential calibration needs"):
        run(wide_llama, "fp8-static", tmp_path / "o", mode="sequential", max_memory="100MB")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_data_free_recipes_never_build_the_model_and_match_in_memory(tmp_path, monkeypatch):
    whole = run(TINYSTORIES, "int8-w8a8-dynamic", tmp_path / "whole", mode="in-memory", dataset=None)
    import calib.models

    def no_load(*args, **kwargs):
        raise AssertionError("the data-free path loaded the model")

    monkeypatch.setattr(calib.models, "load_model", no_load)
    free = run(TINYSTORIES, "int8-w8a8-dynamic", tmp_path / "free", dataset=None)
    assert free["execution"]["mode"] == "data-free" and free["planned_on"] == "skeleton"
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "free")
    assert free["layers_quantized"] == whole["layers_quantized"] == 28
    assert free["size_before_bytes"] == whole["size_before_bytes"]
    assert free["model_fingerprint"].startswith("sha256-headers:")


def test_sequential_needs_safetensors(tmp_path):
    """The embedded default is a GGUF file: sequential mode cannot stream it."""
    with pytest.raises(CalibInputError, match="GGUF"):
        calib.run(recipe="fp8-static", output=tmp_path / "o", mode="sequential", progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(CalibInputError, match="mode 'fast'"):
        calib.run(model=str(TINYSTORIES), output=tmp_path / "o", mode="fast", progress=False)


def test_cli_sequential_flag_and_summary(tmp_path, capsys):
    code = main(["run", "--model", str(TINYSTORIES), "--dataset", str(TINYSTORIES_TEXT), "--num-samples", "8",
                 "--seq-len", "32", "--sequential", "--output", str(tmp_path / "o"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "mode        sequential: asked for (--sequential)" in out
    report = json.loads((tmp_path / "o" / "calib_report.json").read_text())
    assert report["execution"]["mode"] == "sequential" and report["sequential"]["layers"] == 4
    with pytest.raises(SystemExit):
        main(["run", "--sequential", "--in-memory"])


def test_dry_run_names_the_mode_and_writes_nothing(wide_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "--model", str(wide_llama), "--dataset", str(TINYSTORIES_TEXT), "--num-samples", "8",
                 "--seq-len", "32", "--dry-run", "--max-memory", "700MB", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "mode        sequential" in out and "below the least sequential" in out
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    from test_native_names import FAMILIES, auto_class

    root = tmp_path_factory.mktemp("family-models")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))
    out = {}
    for family, make in FAMILIES.items():
        torch.manual_seed(0)
        auto_class(family).from_config(make()).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3", "opt", "gpt_neox", "bert"])
def test_every_family_writes_the_same_checkpoint_sequentially(family, family_folders, tmp_path):
    """Source names plus scales, in both modes, for the whole architecture matrix
    (GPT-NeoX's head stays ``embed_out``, BERT keeps its prefix-free names)."""
    folder = family_folders[family]
    recipe = "fp8-static-kv" if family in ("llama", "qwen2") else "fp8-static"
    whole = calib.run(model=str(folder), recipe=recipe, dataset=str(TINYSTORIES_TEXT), output=tmp_path / "whole",
                      num_samples=6, seq_len=32, batch_size=3, progress=False, mode="in-memory")
    seq = calib.run(model=str(folder), recipe=recipe, dataset=str(TINYSTORIES_TEXT), output=tmp_path / "seq",
                    num_samples=6, seq_len=32, batch_size=3, progress=False, mode="sequential")
    assert seq["execution"]["mode"] == "sequential" and seq["layers_quantized"] == whole["layers_quantized"] > 0
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "seq")
    source = file_tensors(folder)
    out = file_tensors(tmp_path / "seq")
    assert set(out) - set(source) == {n for n in out if n.endswith(SCALES)}
    assert set(source) - set(out) == set()
    for name in source:
        if not name.endswith(".weight") or f"{name[:-len('.weight')]}.weight_scale" not in out:
            assert raw(out[name]) == raw(source[name]), name  # untouched: byte for byte


@pytest.mark.parametrize("family, recipe", [("gemma", "int8-w8a8-static"), ("phi3", "int8-w8a8-static"),
                                            ("opt", "int8-w8a8-static"), ("gpt_neox", "int8-w8a8-static"),
                                            ("bert", "int8-w8a8-static"), ("phi3", "int8-w8a8-gptq")])
def test_smoothquant_families_write_the_same_checkpoint_sequentially(family, recipe, family_folders, tmp_path):
    """SmoothQuant beyond Llama (Gemma's 1 + w norms, Phi-3's fused projections as
    consumers and, through their value and up rows, producers; OPT's LayerNorm biases
    and fc1 -> fc2, GPT-NeoX's interleaved value rows, BERT's value -> output): the
    sequential writer's transforms of the source give the in-memory model's smoothed
    tensors, bit for bit; with GPTQ in order, Phi-3's rounded qkv_proj and
    gate_up_proj take their rows' rescaling the same way in both."""
    folder = family_folders[family]
    kwargs = dict(model=str(folder), recipe=recipe, dataset=str(TINYSTORIES_TEXT), num_samples=6,
                  seq_len=32, batch_size=3, progress=False)
    whole = calib.run(output=tmp_path / "whole", mode="in-memory", **kwargs)
    seq = calib.run(output=tmp_path / "seq", mode="sequential", **kwargs)
    assert whole["smoothquant_pairs"] == seq["smoothquant_pairs"] > 0
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "seq")
