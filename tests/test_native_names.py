"""Checkpoint names (calib/checkpoint.py): calib writes every tensor under the
name the source checkpoint uses, copies what it does not quantize byte for
byte, and maps between the checkpoint's names and transformers' module names
per family (GPT-NeoX's ``embed_out``, BERT's ``bert.`` prefix, tied heads).

The matrix: random-init tiny Llama, Qwen2 (q/k/v biases), Gemma (tied head),
Phi-3 (fused qkv/gate_up), OPT (tied head), GPT-NeoX (``embed_out`` renamed to
``lm_head`` on load) and BERT, saved with ``save_pretrained``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import calib
from calib.checkpoint import NameMap, SafetensorsSource, StateDictSource
from calib.errors import CalibInputError
from calib.quantize import plan_for, quantized_module_tensors
from calib.stream import quantize_data_free
from conftest import SHARED, TINYSTORIES

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
              max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **COMMON),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **COMMON),
    "gemma": lambda: transformers.GemmaConfig(num_key_value_heads=2, head_dim=16, **COMMON),
    "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=2, **COMMON),
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                          vocab_size=512, max_position_embeddings=64, word_embed_proj_dim=64),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**COMMON),
    "bert": lambda: transformers.BertConfig(**COMMON),
}
DATA_FREE = ["fp8-dynamic", "int8-w8a8-dynamic", "int8-w8a16", "int4-w4a16"]
SCALE_SUFFIXES = ("weight_scale", "input_scale", "input_zero_point", "k_scale", "v_scale", "weight_packed",
                  "weight_shape")
IDS = torch.tensor([[5, 17, 99, 200, 301, 4, 77, 450, 12, 3]])


def auto_class(family: str):
    return transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))
    out = {}
    for family, make in FAMILIES.items():
        torch.manual_seed(0)
        model = auto_class(family).from_config(make())
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def streamed(families, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """Every family quantized with every data-free recipe, by the data-free path."""
    root = tmp_path_factory.mktemp("streamed")
    out = {}
    for family, folder in families.items():
        for recipe in DATA_FREE:
            target = root / f"{family}-{recipe}"
            target.mkdir()
            quantize_data_free(folder, recipe, target, workers=2)
            out[family, recipe] = target
    return out


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Read with safetensors itself (not calib's reader)."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_output_names_are_the_source_names_plus_scales_and_untouched_tensors_are_byte_identical(
        family, families, streamed):
    source = file_tensors(families[family])
    for recipe_name in DATA_FREE:
        recipe = calib.load_recipe(recipe_name)
        out = file_tensors(streamed[family, recipe_name])
        config = json.loads((streamed[family, recipe_name] / "config.json").read_text())
        quantized = {n.removesuffix(".weight_scale") for n in out if n.endswith(".weight_scale")}
        assert quantized, recipe_name
        packed = recipe.format == "pack-quantized"
        replaced = {f"{m}.weight" for m in quantized} if packed else set()
        expected = (set(source) - replaced) | {f"{m}.{s}" for m in quantized for s in (
            ("weight_packed", "weight_scale", "weight_shape") if packed else ("weight_scale",))}
        assert set(out) == expected, (family, recipe_name, set(out) ^ expected)
        assert all(f"{m}.weight" in source for m in quantized)  # scales sit under source prefixes
        untouched = [n for n in source if n.rpartition(".")[0] not in quantized]
        assert all(raw(out[n]) == raw(source[n]) and out[n].dtype == source[n].dtype for n in untouched)
        # ignore lists module names; for these dense models they are the checkpoint's prefixes too
        ignore = set(config["quantization_config"]["ignore"])
        assert not any(n.startswith(("lm_head.", "embed_out.")) and n.endswith("_scale") for n in out)
        assert ignore - {"lm_head", "embed_out"} == set()  # nothing else is left out of these recipes
        if family in ("gemma", "opt"):  # tied head: the source stores the embeddings only, and so do we
            assert "lm_head.weight" not in source and "lm_head.weight" not in out
        elif family != "bert":
            head = {"gpt_neox": "embed_out"}.get(family, "lm_head")  # the head as stored, and as ignored
            assert f"{head}.weight" in source and head in ignore


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_data_free_path_writes_the_in_memory_tensors(family, families, streamed):
    """Never building the model gives exactly the tensors today's in-memory
    quantization computes from the loaded model (module names mapped back)."""
    model = auto_class(family).from_pretrained(str(families[family])).eval()
    rename = {"gpt_neox": {"lm_head.weight": "embed_out.weight"}}.get(family, {})
    for recipe_name in DATA_FREE:
        recipe = calib.load_recipe(recipe_name)
        plan = plan_for(model, recipe, warn=False)
        want = {rename.get(k, k): v for k, v in quantized_module_tensors(model, recipe, plan)}
        got = file_tensors(streamed[family, recipe_name])
        assert sorted(got) == sorted(want), (recipe_name, set(got) ^ set(want))
        assert all(raw(got[k]) == raw(want[k]) and got[k].dtype == want[k].dtype for k in want), recipe_name
        config = json.loads((streamed[family, recipe_name] / "config.json").read_text())
        assert set(plan.ignored) <= set(config["quantization_config"]["ignore"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dense_checkpoints_reload_through_compressed_tensors_with_close_logits(family, families, streamed):
    auto = auto_class(family)
    reference = auto.from_pretrained(str(families[family])).eval()
    with torch.no_grad():
        ref = reference(IDS)
    ref = ref.logits if hasattr(ref, "logits") else ref.last_hidden_state
    for recipe_name, bound in (("fp8-dynamic", 0.08), ("int8-w8a8-dynamic", 0.03)):
        folder = streamed[family, recipe_name]
        reloaded, info = auto.from_pretrained(str(folder), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            out = reloaded.eval()(IDS)
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        error = float((out - ref).norm() / ref.norm())
        assert 0 < error < bound, (recipe_name, error)


def test_gpt_neox_keeps_embed_out_under_its_own_name(families, streamed, tmp_path):
    """transformers 5 renames the checkpoint's ``embed_out.`` to the module's
    ``lm_head.`` on load; calib used to write the module name. Both paths now
    write ``embed_out.weight`` (the in-memory one as save_pretrained names it)."""
    folder = families["gpt_neox"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert "lm_head.weight" in model.state_dict()
    calib.export(model, calib.load_recipe("fp8-dynamic"), tmp_path / "memory", progress=False)
    for out in (tmp_path / "memory", streamed["gpt_neox", "fp8-dynamic"]):
        tensors = file_tensors(out)
        assert "embed_out.weight" in tensors and "lm_head.weight" not in tensors
        assert raw(tensors["embed_out.weight"]) == raw(model.lm_head.weight.detach())
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert sorted(StateDictSource(model).names()) == sorted(f.keys())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "memory"))
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_model_in_memory_is_named_as_save_pretrained_names_it(family, families):
    """StateDictSource (GGUF models, API callers): the names save_pretrained
    writes, each tied tensor once, and a name map that is exact."""
    model = auto_class(family).from_pretrained(str(families[family]))
    with safe_open(str(families[family] / "model.safetensors"), "pt") as f:
        stored = sorted(f.keys())
    source = StateDictSource(model)
    assert sorted(source.names()) == stored
    name_map = NameMap.for_model(model, source)
    with SafetensorsSource(families[family]) as files:
        from_files = NameMap.for_model(model, files)
    assert name_map.to_module == from_files.to_module


def test_bert_saved_for_masked_lm_keeps_its_prefix_and_its_module_names(tmp_path):
    """A BertForMaskedLM checkpoint (``bert.`` prefix, decoder tied to the word
    embeddings): the skeleton is the class config.json names, so module names,
    the ignore list and the stored prefixes agree and it reloads as saved."""
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(FAMILIES["bert"]()).eval()
    src = tmp_path / "bert-mlm"
    model.save_pretrained(src)
    out = tmp_path / "out"
    out.mkdir()
    summary = quantize_data_free(src, "int8-w8a8-dynamic", out)
    assert summary.model_class == "BertForMaskedLM"
    source, written = file_tensors(src), file_tensors(out)
    assert all(n.startswith(("bert.", "cls.")) for n in written)
    assert "cls.predictions.decoder.weight" not in written  # tied: stored once, as in the source
    quantized = {n.removesuffix(".weight_scale") for n in written if n.endswith(".weight_scale")}
    assert "cls.predictions.transform.dense" in quantized
    module_names = {n for n, _ in model.named_modules()}
    assert quantized <= module_names and all(f"{m}.weight" in source for m in quantized)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert "cls.predictions.decoder" in ignore and set(ignore) - {"lm_head"} <= module_names
    reloaded = transformers.BertForMaskedLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        a, b = model(IDS).logits, reloaded(IDS).logits
    assert float((a - b).norm() / a.norm()) < 0.03


def test_tied_embeddings_stay_stored_once(tmp_path):
    """aidreams260K ties lm_head to the embeddings and stores only the embeddings."""
    src = SHARED / "models" / "aidreams260K"
    out = tmp_path / "out"
    out.mkdir()
    quantize_data_free(src, "fp8-dynamic", out)
    source, written = file_tensors(src), file_tensors(out)
    assert "lm_head.weight" not in source and "lm_head.weight" not in written
    assert raw(written["model.embed_tokens.weight"]) == raw(source["model.embed_tokens.weight"])


def edited_copy(src: Path, dst: Path, drop: str | None = None, add: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    tensors = file_tensors(src)
    if drop:
        del tensors[drop]
    tensors.update(add or {})
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_tensors_without_a_place_and_places_without_a_tensor_are_named(families, tmp_path):
    llama = families["llama"]
    cases = {
        "extra": (dict(add={"model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}),
                  ["model.layers.0.mlp.extra_proj.weight", "has no place"]),
        "dropped": (dict(drop="model.layers.1.self_attn.o_proj.weight"),
                    ["model.layers.1.self_attn.o_proj.weight", "no tensor for"]),
    }
    for label, (edit, expected) in cases.items():
        folder = edited_copy(llama, tmp_path / label, **edit)
        out = tmp_path / f"out-{label}"
        out.mkdir()
        with pytest.raises(CalibInputError) as err:
            quantize_data_free(folder, "fp8-dynamic", out)
        assert all(text in str(err.value) for text in expected), str(err.value)
        assert list(out.iterdir()) == []

    # an old checkpoint's per-layer rotary inv_freq: transformers drops it on load; calib copies it as it is
    inv_freq = torch.arange(8, dtype=torch.float32)
    folder = edited_copy(llama, tmp_path / "inv_freq", add={"model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq})
    out = tmp_path / "out-inv_freq"
    out.mkdir()
    quantize_data_free(folder, "fp8-dynamic", out)
    assert raw(file_tensors(out)["model.layers.0.self_attn.rotary_emb.inv_freq"]) == raw(inv_freq)


def test_tensors_transformers_converts_map_only_onto_split_experts(tmp_path):
    """Mixtral's per-expert w1/w2/w3 are stacked into 3-D parameters on load. The
    data-free path splits the experts (calib.moe) and writes them per expert; a
    model left fused has no place for them, and the name map says so, naming them."""
    config = transformers.MixtralConfig(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, **COMMON)
    torch.manual_seed(0)
    fused = transformers.AutoModelForCausalLM.from_config(config)
    fused.save_pretrained(tmp_path / "mixtral")
    with SafetensorsSource(tmp_path / "mixtral") as source:
        with pytest.raises(CalibInputError, match=r"not support.*block_sparse_moe\.experts\.0\.w1\.weight"):
            NameMap.for_model(fused, source)
    out = tmp_path / "out"
    out.mkdir()
    summary = quantize_data_free(tmp_path / "mixtral", "fp8-dynamic", out)
    written = file_tensors(out)
    assert written["model.layers.0.block_sparse_moe.experts.1.w2.weight"].dtype == torch.float8_e4m3fn
    assert summary.result.layers and all(".gate" not in layer.name for layer in summary.result.layers)
