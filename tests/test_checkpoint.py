"""Checkpoints of a real trained Llama, read back by an independent reader
(transformers + compressed-tensors), checked tensor by tensor and by
held-out perplexity."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open

import calib
from calib.data import build_calibration_set
from calib.errors import CalibInputError
from calib.evaluate import perplexity
from calib.load import read_tensors
from calib.recipe import CalibrationDefaults
from conftest import CHECKPOINT_SAMPLES as SAMPLES
from conftest import CHECKPOINT_SEQ as SEQ
from conftest import TINYSTORIES, cache_kwargs
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def ct_load(path, **kwargs):
    """The independent reader: transformers with compressed-tensors."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))


@pytest.fixture(scope="module")
def fp32_ppl(tinystories_split, tokenizer):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    return perplexity(model, tokenizer, tinystories_split[1])


def tensors_of(path):
    return read_tensors(path)[0]


def linear_names():
    return [f"model.layers.{i}.{'self_attn' if p in LINEARS[:4] else 'mlp'}.{p}" for i in range(4) for p in LINEARS]


@pytest.mark.parametrize("recipe, wdtype, wscale_shape, has_input_scale", [
    ("fp8-static", torch.float8_e4m3fn, "tensor", True),
    ("fp8-dynamic", torch.float8_e4m3fn, "channel", False),
    ("fp8-static-kv", torch.float8_e4m3fn, "tensor", True),
    ("int8-w8a8-dynamic", torch.int8, "channel", False),
    ("int8-w8a8-static", torch.int8, "channel", True),
])
def test_tensor_names_dtypes_and_shapes(checkpoints, recipe, wdtype, wscale_shape, has_input_scale):
    tensors = tensors_of(checkpoints[recipe][0])
    for name in linear_names():
        w = tensors[f"{name}.weight"]
        assert w.dtype == wdtype and w.dim() == 2
        scale = tensors[f"{name}.weight_scale"]
        assert scale.dtype == torch.float32
        expected = (1,) if wscale_shape == "tensor" else (w.shape[0], 1)
        assert tuple(scale.shape) == expected  # [1] not [1, 1]; [out, 1] not [out]
        assert (scale > 0).all() and torch.isfinite(scale).all()
        assert (f"{name}.input_scale" in tensors) == has_input_scale
        if has_input_scale:
            assert tuple(tensors[f"{name}.input_scale"].shape) == (1,)
    assert not [k for k in tensors if "zero_point" in k]  # symmetric: vLLM rejects unexpected names
    assert tensors["lm_head.weight"].dtype == torch.float32  # ignored: high precision
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert tensors["model.norm.weight"].dtype == torch.float32
    assert ("model.layers.0.self_attn.k_scale" in tensors) == (recipe == "fp8-static-kv")


def test_weights_are_quantized_with_the_stored_scale(checkpoints):
    tensors = tensors_of(checkpoints["fp8-static"][0])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES))
    w = base.model.layers[1].mlp.down_proj.weight.detach()
    q, scale = tensors["model.layers.1.mlp.down_proj.weight"], tensors["model.layers.1.mlp.down_proj.weight_scale"]
    expected = torch.clamp(w / scale, -448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    torch.testing.assert_close(scale, (w.abs().max() / 448).reshape(1))


def test_quantization_config_is_what_compressed_tensors_reads(checkpoints):
    from compressed_tensors.quantization import QuantizationConfig

    for recipe, (path, _) in checkpoints.items():
        config = json.loads((path / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors"
        assert config["quantization_status"] == "compressed"
        assert config["ignore"] == ["lm_head"]
        parsed = QuantizationConfig.model_validate(config)
        group = parsed.config_groups["group_0"]
        assert group.targets == ["Linear"]
        expected_format = {"fp8": "float-quantized", "int8-w8a8": "int-quantized", "int8-w8a16": "pack-quantized",
                           "int4": "pack-quantized"}
        assert config["format"] == next(v for k, v in expected_format.items() if recipe.startswith(k))
        if recipe == "fp8-static-kv":
            kv = config["kv_cache_scheme"]
            assert kv == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                          "dynamic": False, "group_size": None, "block_structure": None, "actorder": None,
                          "observer": "minmax", "observer_kwargs": {}}
        else:
            assert config["kv_cache_scheme"] is None


@pytest.mark.parametrize("recipe", ["fp8-static", "fp8-static-kv", "int8-w8a8-static"])
def test_fused_projections_get_identical_input_scales(checkpoints, recipe):
    tensors = tensors_of(checkpoints[recipe][0])
    for i in range(4):
        attn = [tensors[f"model.layers.{i}.self_attn.{p}_proj.input_scale"] for p in "qkv"]
        mlp = [tensors[f"model.layers.{i}.mlp.{p}_proj.input_scale"] for p in ("gate", "up")]
        assert torch.equal(attn[0], attn[1]) and torch.equal(attn[0], attn[2])
        assert torch.equal(mlp[0], mlp[1])
        assert not torch.equal(attn[0], tensors[f"model.layers.{i}.self_attn.o_proj.input_scale"])


def test_fp8_per_tensor_weight_scales_are_shared_by_fused_shards(checkpoints):
    tensors = tensors_of(checkpoints["fp8-static"][0])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES))
    for i in range(4):
        attn = [tensors[f"model.layers.{i}.self_attn.{p}_proj.weight_scale"] for p in "qkv"]
        assert torch.equal(attn[0], attn[1]) and torch.equal(attn[1], attn[2])
        layer = base.model.layers[i].self_attn
        top = max(float(m.weight.detach().abs().max()) for m in (layer.q_proj, layer.k_proj, layer.v_proj))
        assert float(attn[0]) == pytest.approx(top / 448, rel=1e-6)
        mlp = [tensors[f"model.layers.{i}.mlp.{p}_proj.weight_scale"] for p in ("gate", "up")]
        assert torch.equal(mlp[0], mlp[1])


def test_fp8_per_shard_weight_scales_on_request(checkpoints, tinystories_split, tmp_path, fp32_ppl, tokenizer):
    """weights.fused_scale: per_shard gives every shard its own max / 448 (llm-compressor's layout,
    re-quantized to the largest by vLLM at load); the inputs still share one scale; transformers +
    compressed-tensors reads it."""
    recipe = tmp_path / "fp8-static-per-shard.yaml"
    data = yaml.safe_load((calib.bundled_recipes()["fp8-static"]).read_text())
    data["name"] = "fp8-static-per-shard"
    data["weights"]["fused_scale"] = "per_shard"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    calib.run(model=str(TINYSTORIES), recipe=str(recipe), dataset=str(tinystories_split[0]), output=out,
              num_samples=SAMPLES, seq_len=SEQ, batch_size=16, progress=False)
    tensors = tensors_of(out)
    shared = tensors_of(checkpoints["fp8-static"][0])
    base = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES))
    for i in range(4):
        layer = base.model.layers[i]
        for parent, module, names in (("self_attn", layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                                      ("mlp", layer.mlp, ("gate_proj", "up_proj"))):
            scales = []
            for p in names:
                key = f"model.layers.{i}.{parent}.{p}"
                own = float(getattr(module, p).weight.detach().abs().max()) / 448
                assert float(tensors[f"{key}.weight_scale"]) == pytest.approx(own, rel=1e-6), key
                scales.append(float(tensors[f"{key}.weight_scale"]))
                assert torch.equal(tensors[f"{key}.input_scale"], shared[f"{key}.input_scale"])  # inputs: as before
            assert max(scales) == pytest.approx(float(shared[f"model.layers.{i}.{parent}.{names[0]}.weight_scale"]),
                                                rel=1e-6)
        assert len({float(tensors[f"model.layers.{i}.self_attn.{p}.weight_scale"]) for p in ("q_proj", "k_proj",
                                                                                             "v_proj")}) > 1
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "fused_scale" not in json.dumps(config)
    ppl = perplexity(ct_load(out), tokenizer, tinystories_split[1])
    assert ppl / fp32_ppl < 1.02


def test_input_scales_equal_observed_activation_max(checkpoints, tinystories_split, tokenizer):
    """input_scale = max |input| over the real (unpadded) calibration tokens / 448."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    data = build_calibration_set(tokenizer, tinystories_split[0], num_samples=SAMPLES, seq_len=SEQ)
    seen = {}

    def grab(name):
        def hook(module, args):
            seen[name] = max(seen.get(name, 0.0), float(args[0].abs().max()))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(grab(n)) for n in linear_names()]
    with torch.no_grad():
        for batch in data.batches(16, 0):
            model(**batch)
    for h in handles:
        h.remove()
    tensors = tensors_of(checkpoints["fp8-static"][0])
    for name in linear_names():
        assert float(tensors[f"{name}.input_scale"]) == pytest.approx(seen[name] / 448, rel=1e-6)


@pytest.mark.parametrize("recipe, bound", [
    ("fp8-static", 1.02),  # issue bound; llm-compressor: 1.013x
    ("int8-w8a8-dynamic", 1.01),  # issue bound; llm-compressor: 1.0001x
    ("fp8-dynamic", 1.02),
    ("fp8-static-kv", 1.03),
    ("int8-w8a8-static", 1.02),
    ("int8-w8a16", 1.005),
    # group 64, round-to-nearest INT4, clip minimising |error|^3 (no GPTQ): measured 1.0814 (the squared
    # error's 1.0735 here costs SmolLM2 1.470 against 1.383: README, INT4 clip; min-max 1.12)
    ("int4-w4a16", 1.09),
])
def test_heldout_perplexity_through_compressed_tensors(checkpoints, tinystories_split, tokenizer, fp32_ppl,
                                                       recipe, bound):
    assert fp32_ppl == pytest.approx(12.09, abs=0.02)  # the fixture's documented baseline
    model = ct_load(checkpoints[recipe][0])
    q_proj = model.model.layers[0].self_attn.q_proj
    # the reader kept the quantized tensors
    stored = q_proj.weight_packed if hasattr(q_proj, "weight_packed") else q_proj.weight
    assert stored.dtype in (torch.float8_e4m3fn, torch.int8, torch.int32)
    ratio = perplexity(model, tokenizer, tinystories_split[1]) / fp32_ppl
    assert 0.99 < ratio <= bound, f"{recipe}: PPL ratio {ratio:.4f} > {bound}"


@pytest.mark.parametrize("recipe, bits, per_word", [("int8-w8a16", 8, 4), ("int4-w4a16", 4, 8)])
def test_packed_weight_only_checkpoints(checkpoints, tokenizer, recipe, bits, per_word):
    """pack-quantized: int32 words, original shape, per-channel or per-group scales; our loader
    and compressed-tensors decode the same weights."""
    path = checkpoints[recipe][0]
    tensors = tensors_of(path)
    for name in linear_names():
        packed, shape = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_shape"]
        assert f"{name}.weight" not in tensors
        assert packed.dtype == torch.int32 and shape.tolist() == [packed.shape[0], packed.shape[1] * per_word]
        scale = tensors[f"{name}.weight_scale"]
        groups = 1 if bits == 8 else shape[1] // 64
        assert tuple(scale.shape) == (shape[0], groups)
    ours, theirs = calib.load(path), ct_load(path)
    ids = tokenizer("Once upon a time there was a little cat.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_kv_scales_come_from_the_keys_the_cache_stores(checkpoints, tinystories_split, tokenizer):
    """Reference: run the same batches with a plain DynamicCache and read what it stored."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    data = build_calibration_set(tokenizer, tinystories_split[0], num_samples=SAMPLES, seq_len=SEQ)
    kmax, vmax = [0.0] * 4, [0.0] * 4
    with torch.no_grad():
        for batch in data.batches(16, 0):
            cache = transformers.DynamicCache()
            model(**batch, **cache_kwargs(model, cache), use_cache=True)
            for i in range(4):
                kmax[i] = max(kmax[i], float(cache.layers[i].keys.abs().max()))
                vmax[i] = max(vmax[i], float(cache.layers[i].values.abs().max()))
    tensors = tensors_of(checkpoints["fp8-static-kv"][0])
    for i in range(4):
        k, v = tensors[f"model.layers.{i}.self_attn.k_scale"], tensors[f"model.layers.{i}.self_attn.v_scale"]
        assert tuple(k.shape) == (1,) and float(k) > 0 and float(v) > 0
        assert float(k) == pytest.approx(kmax[i] / 448, rel=1e-6)
        assert float(v) == pytest.approx(vmax[i] / 448, rel=1e-6)


def test_provenance_metadata_and_report(checkpoints):
    path, report = checkpoints["fp8-static"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["format"] == "pt"
    assert meta["calib_version"] == calib.__version__
    used = calib.load_recipe("fp8-static").model_copy(update={"calibration": CalibrationDefaults(
        num_samples=SAMPLES, seq_len=SEQ, batch_size=16)})
    assert calib.parse_recipe(meta["calib_recipe"]) == used  # the recipe as run: samples actually used
    assert meta["calib_model"] == "tinystories-llama-263k" and meta["calib_dataset"] == "tinystories_calib.txt"
    assert meta["calib_model_fingerprint"].startswith("sha256:")
    assert str(TINYSTORIES.parent) not in json.dumps(meta) and "/tmp" not in json.dumps(meta)
    assert meta["calib_num_samples"] == str(SAMPLES) and meta["calib_seq_len"] == str(SEQ)
    assert meta["calib_dataset_fingerprint"] == report["dataset_fingerprint"]
    assert meta["calib_dataset_fingerprint"].startswith("sha256:")
    on_disk = json.loads((path / "calib_report.json").read_text())
    assert on_disk["layers_quantized"] == 28
    assert set(on_disk["timings_s"]) >= {"load", "calibrate", "quantize", "export", "total"}
    assert on_disk["size_after_bytes"] < on_disk["size_before_bytes"]
    assert on_disk["calibration_tokens"] == SAMPLES * SEQ
    assert yaml.safe_load((path / "recipe.yaml").read_text())["name"] == "fp8-static"
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["_name_or_path"] == "tinystories-llama-263k"
    assert (path / "tokenizer.json").is_file() and (path / "generation_config.json").is_file()


def test_bf16_model_keeps_bf16_tensors_and_reloads(tinystories_split, tokenizer, fp32_ppl, tmp_path):
    out = tmp_path / "bf16"
    calib.run(model=str(TINYSTORIES), recipe="fp8-static-kv", dataset=str(tinystories_split[0]), output=out,
              num_samples=32, seq_len=SEQ, dtype="bfloat16", progress=False)
    tensors = tensors_of(out)
    for key, tensor in tensors.items():
        if key.endswith(".weight") and "proj" in key:
            assert tensor.dtype == torch.float8_e4m3fn
        else:  # norms, embeddings, lm_head and every scale stay in the model dtype
            assert tensor.dtype == torch.bfloat16, key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = ct_load(out)
    assert model.model.norm.weight.dtype == torch.bfloat16
    ratio = perplexity(model, tokenizer, tinystories_split[1], max_windows=64) / fp32_ppl
    assert ratio < 1.05


def test_sharded_export_has_an_index_and_loads_the_same(checkpoints, tinystories_split, tokenizer, tmp_path):
    out = tmp_path / "sharded"
    calib.run(model=str(TINYSTORIES), recipe="fp8-static", dataset=str(tinystories_split[0]), output=out,
              num_samples=SAMPLES, seq_len=SEQ, batch_size=16, max_shard_size="150KB", progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = tensors_of(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    single = tensors_of(checkpoints["fp8-static"][0])
    assert all(torch.equal(single[k].view(torch.uint8) if single[k].dtype == torch.float8_e4m3fn else single[k],
                           tensors[k].view(torch.uint8) if tensors[k].dtype == torch.float8_e4m3fn else tensors[k])
               for k in single)
    ids = tokenizer("The dog ran to the park.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ct_load(out)(ids).logits, ct_load(checkpoints["fp8-static"][0])(ids).logits)


def test_existing_output_is_refused_without_overwrite(checkpoints, tinystories_split):
    path = checkpoints["int8-w8a16"][0]
    before = (path / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(CalibInputError, match="--overwrite"):
        calib.run(model=str(TINYSTORIES), recipe="int8-w8a16", output=path, progress=False)
    assert (path / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("mode", ["in-memory", "auto"])  # auto: int8-w8a16 takes the data-free path
def test_interrupted_export_leaves_no_checkpoint_and_keeps_the_old_one(mode, tinystories_split, tmp_path,
                                                                       monkeypatch):
    import importlib

    export_module = importlib.import_module("calib.export")  # calib.export is also the function
    out = tmp_path / "ckpt"
    report = calib.run(model=str(TINYSTORIES), recipe="int8-w8a16", output=out, progress=False, mode=mode)
    assert report["execution"]["mode"] == ("in-memory" if mode == "in-memory" else "data-free")
    original = (out / "model.safetensors").read_bytes()
    calls = []

    def failing(real):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt("simulated interruption")
            return real(*args, **kwargs)
        return call

    if mode == "in-memory":
        monkeypatch.setattr(export_module, "save_file", failing(export_module.save_file))
    else:  # the second tensor written at its offset
        monkeypatch.setattr(export_module.PlannedWriter, "write", failing(export_module.PlannedWriter.write))
    for target, overwrite in ((tmp_path / "fresh", False), (out, True)):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            calib.run(model=str(TINYSTORIES), recipe="int8-w8a16", output=target, max_shard_size="100KB",
                      overwrite=overwrite, progress=False, mode=mode)
    assert not (tmp_path / "fresh").exists()
    assert (out / "model.safetensors").read_bytes() == original  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial directories left behind


def test_asymmetric_static_int8_activations_write_a_zero_point(tinystories_split, tokenizer, fp32_ppl, tmp_path):
    base = calib.load_recipe("int8-w8a8-static")
    acts = base.input_activations.model_copy(update={"symmetric": False, "observer": "minmax", "observer_kwargs": {}})
    out = tmp_path / "asym"
    calib.run(model=str(TINYSTORIES), recipe=base.model_copy(update={"input_activations": acts}),
              dataset=str(tinystories_split[0]), output=out, num_samples=SAMPLES, seq_len=SEQ, progress=False)
    tensors = tensors_of(out)
    for name in linear_names():
        zp, scale = tensors[f"{name}.input_zero_point"], tensors[f"{name}.input_scale"]
        assert zp.dtype == torch.int8 and tuple(zp.shape) == (1,) and tuple(scale.shape) == (1,)
    # down_proj reads SiLU(gate) * up, which is not symmetric around 0: the zero point moves
    assert any(int(tensors[f"{n}.input_zero_point"]) != 0 for n in linear_names())
    q, k = (tensors[f"model.layers.0.self_attn.{p}_proj.input_zero_point"] for p in "qk")
    assert torch.equal(q, k)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["input_activations"]["symmetric"] is False
    ratio = perplexity(ct_load(out), tokenizer, tinystories_split[1]) / fp32_ppl
    assert ratio < 1.03, ratio


def test_fp8_weight_only_is_naive_quantized_and_reloads(tinystories_split, tokenizer, fp32_ppl, tmp_path):
    recipe = calib.parse_recipe("name: fp8-w8a16\nweights: {type: float, strategy: channel}\n")
    out = tmp_path / "fp8w"
    report = calib.run(model=str(TINYSTORIES), recipe=recipe, output=out, progress=False)
    assert report["num_samples"] == 0  # weight-only: no data
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "naive-quantized"
    assert config["config_groups"]["group_0"]["input_activations"] is None
    tensors = tensors_of(out)
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert not [k for k in tensors if k.endswith("input_scale")]
    ratio = perplexity(ct_load(out), tokenizer, tinystories_split[1]) / fp32_ppl
    assert ratio < 1.01, ratio
