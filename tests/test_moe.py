"""Mixture-of-experts and the other layouts (calib/moe.py): every expert quantized
per expert under the source checkpoint's names, calibrated on the tokens routed to
it, routers kept in high precision, and no exit 0 with a half-quantized model.

Tiny random-init models of each family, saved with ``save_pretrained`` (which
writes the per-expert names transformers 5 converts on load), calibrated for real
(in memory and layer by layer), read back with safetensors, calib.load and
transformers + compressed-tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import calib
from calib.errors import CalibInputError
from calib.moe import LinearExperts, unfuse_experts
from calib.quantize import plan_for
from calib.data import build_calibration_set
from conftest import TINYSTORIES, TINYSTORIES_TEXT
from test_native_names import file_tensors, raw

MOE = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=512, max_position_embeddings=128)
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(**MOE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**MOE, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**MOE, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=32, head_dim=16),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, vocab_size=512, max_position_embeddings=128),
    "olmoe": lambda: transformers.OlmoeConfig(**MOE, num_experts=4, num_experts_per_tok=2),
}
ROUTERS = {"mixtral": ["block_sparse_moe.gate"], "qwen2_moe": ["mlp.gate", "mlp.shared_expert_gate"],
           "qwen3_moe": ["mlp.gate"], "deepseek_v3": ["mlp.gate"], "olmoe": ["mlp.gate"]}
IDS = torch.tensor([[5, 17, 99, 200, 301, 4, 77, 450, 12, 3, 8, 140, 260, 33, 71, 9]])
RUN = dict(num_samples=6, seq_len=48, batch_size=3, progress=False)


def save(root: Path, name: str, config, edit=None) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if edit is not None:
        edit(model)
    model.save_pretrained(root / name)
    transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES)).save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {family: save(root, family, make()) for family, make in FAMILIES.items()}


@pytest.fixture(scope="module")
def runs(moe_models, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, dict]]:
    """Every MoE family, fp8-static, in memory and sequentially."""
    root = tmp_path_factory.mktemp("moe-out")
    out = {}
    for family, folder in moe_models.items():
        for mode in ("in-memory", "sequential"):
            report = calib.run(model=str(folder), recipe="fp8-static", output=root / f"{family}-{mode}", mode=mode,
                               **RUN)
            out[family, mode] = root / f"{family}-{mode}", report
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_expert_quantized_and_calibrated_under_the_source_names(family, moe_models, runs):
    source = file_tensors(moe_models[family])
    folder, report = runs[family, "in-memory"]
    out = file_tensors(folder)
    quantized = {n.removesuffix(".weight_scale") for n in out if n.endswith(".weight_scale")}
    # names: the source's, plus a weight and input scale per quantized projection
    assert set(out) == set(source) | {f"{m}.{s}" for m in quantized for s in ("weight_scale", "input_scale")}
    experts = {n.removesuffix(".weight") for n in source if ".experts." in n and n.endswith(".weight")}
    assert experts and experts <= quantized  # every expert's every projection
    for m in quantized:
        assert out[f"{m}.weight"].dtype == torch.float8_e4m3fn
        scale = out[f"{m}.input_scale"].float()
        assert torch.isfinite(scale).all() and (scale > 0).all(), m
    # coverage counted from the files: every targeted weight element is an FP8 element
    fp8 = sum(t.numel() for t in out.values() if t.dtype == torch.float8_e4m3fn)
    assert report["coverage"]["quantized_parameters"] == fp8 == report["coverage"]["targeted_parameters"]
    assert report["coverage"]["ratio"] == 1.0
    # routers: unquantized, byte for byte, and listed in ignore under the checkpoint's names
    ignore = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
    routers = [n for n in source if any(f"{r}.weight" in n for r in ROUTERS[family])]
    assert routers
    for name in routers:
        assert raw(out[name]) == raw(source[name]) and name.removesuffix(".weight") in ignore
    # gate/up (w1/w3) of one expert: one input scale and one weight scale, as vLLM's fused w13 needs
    gate, up = ("w1", "w3") if family == "mixtral" else ("gate_proj", "up_proj")
    for m in [m for m in quantized if m.endswith(f".experts.0.{gate}")]:
        sibling = m.removesuffix(gate) + up
        assert torch.equal(out[f"{m}.input_scale"], out[f"{sibling}.input_scale"])
        assert torch.equal(out[f"{m}.weight_scale"], out[f"{sibling}.weight_scale"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sequential_writes_the_same_checkpoint_and_it_reads_back_close_to_the_original(family, moe_models, runs):
    a, report = runs[family, "in-memory"]
    b, _ = runs[family, "sequential"]
    ta, tb = file_tensors(a), file_tensors(b)
    assert set(ta) == set(tb) and all(raw(ta[n]) == raw(tb[n]) for n in ta)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(moe_models[family])).eval()
    model = calib.load(a)
    assert any(isinstance(m, LinearExperts) for m in model.modules())
    with torch.no_grad():
        want, got = reference(IDS).logits, model(IDS).logits
    assert float((got - want).norm() / want.norm()) < 0.08
    # tokens per expert: every real token goes to top-k experts, padding to none
    moe = report["moe"]
    per_layer = [sum(c) for c in moe["tokens_per_expert"].values()]
    assert per_layer == [2 * report["calibration_tokens"]] * len(per_layer)


def test_transformers_and_compressed_tensors_read_the_moe_checkpoint(moe_models, runs):
    pytest.importorskip("compressed_tensors")
    folder, _ = runs["qwen3_moe", "in-memory"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(moe_models["qwen3_moe"])).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        want, got = reference(IDS).logits, model(IDS).logits
    assert float((got - want).norm() / want.norm()) < 0.1


def test_unfused_experts_compute_exactly_what_the_fused_module_does(moe_models):
    """Bit for bit against transformers' eager loop over the experts (the same GEMMs on
    the same rows in the same order); its default grouped_mm path rounds differently
    on some CPUs (AMD EPYC: 1.5e-7 of 0.6 in the logits), so that one to float rounding."""
    path = str(moe_models["mixtral"])
    grouped = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    with torch.no_grad():
        fused, default = model(IDS).logits, grouped(IDS).logits
        assert len(unfuse_experts(model)) == 2 and unfuse_experts(model) == []  # idempotent
        unfused = model(IDS).logits
    assert torch.equal(unfused, fused)
    torch.testing.assert_close(unfused, default, rtol=1e-5, atol=1e-6)


def _starve_expert_3(model) -> None:
    """DeepSeek-V3 picks experts by score + e_score_correction_bias: -100 means never."""
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias[3] = -100.0


@pytest.fixture(scope="module")
def starved(tmp_path_factory) -> Path:
    return save(tmp_path_factory.mktemp("starved"), "deepseek", FAMILIES["deepseek_v3"](), _starve_expert_3)


def test_an_expert_no_token_reaches_gets_its_siblings_range_and_is_reported(starved, tmp_path, capsys):
    report = calib.run(model=str(starved), recipe="fp8-static", output=tmp_path / "out", **RUN)
    expert = "model.layers.1.mlp.experts.3"
    assert report["moe"]["tokens_per_expert"]["model.layers.1.mlp.experts"][3] == 0
    assert report["moe"]["experts_without_tokens"] == [expert]
    assert sorted(report["unobserved_modules"]) == [f"{expert}.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    out = file_tensors(tmp_path / "out")
    siblings = [out[f"model.layers.1.mlp.experts.{e}.down_proj.input_scale"] for e in range(3)]
    assert torch.equal(out[f"{expert}.down_proj.input_scale"], torch.stack(siblings).max().reshape(1))
    from calib.cli import _print_summary

    _print_summary(report)
    assert "1 got none" in capsys.readouterr().out


def test_calibrate_all_experts_observes_every_token_in_every_expert(starved, tmp_path):
    recipe = calib.load_recipe("fp8-static")
    recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(
        update={"moe_calibrate_all_experts": True})})
    report = calib.run(model=str(starved), recipe=recipe, output=tmp_path / "out", **RUN)
    assert report["moe"]["calibrate_all_experts"] and not report["unobserved_modules"]
    observed = {layer["name"]: layer["observed_tokens"] for layer in report["layers"]}
    assert observed["model.layers.1.mlp.experts.3.gate_proj"] == report["calibration_tokens"]
    assert "moe_calibrate_all_experts: true" in (tmp_path / "out" / "recipe.yaml").read_text()
    # the outputs still follow the router: the non-expert scales match a routed run's
    routed = calib.run(model=str(starved), recipe="fp8-static", output=tmp_path / "routed", **RUN)
    a, b = file_tensors(tmp_path / "out"), file_tensors(tmp_path / "routed")
    assert torch.equal(a["model.layers.0.self_attn.q_a_proj.input_scale"],
                       b["model.layers.0.self_attn.q_a_proj.input_scale"])
    assert routed["moe"]["experts_without_tokens"]


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> Path:
    config = transformers.GptOssConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       num_local_experts=4, num_experts_per_tok=2, vocab_size=512,
                                       max_position_embeddings=128, layer_types=["sliding_attention", "full_attention"])
    return save(tmp_path_factory.mktemp("gpt-oss"), "gpt_oss", config)


def test_a_layout_calib_cannot_quantize_is_an_error_naming_module_and_class(gpt_oss, tmp_path):
    with pytest.raises(CalibInputError, match=r"model\.layers\.0\.mlp\.experts \(GptOssExperts\)"):
        calib.run(model=str(gpt_oss), recipe="fp8-dynamic", output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=512))
    with pytest.raises(CalibInputError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\)"):
        plan_for(gpt2, calib.load_recipe("fp8-dynamic"))


def test_an_explicit_ignore_leaves_the_unsupported_module_in_high_precision_and_listed(gpt_oss, tmp_path):
    recipe = calib.load_recipe("fp8-dynamic")
    recipe = recipe.model_copy(update={"ignore": ["lm_head", r"re:.*mlp\.experts$"]})
    report = calib.run(model=str(gpt_oss), recipe=recipe, output=tmp_path / "out", progress=False)
    assert len(report["coverage"]["unsupported_ignored"]) == 2 and report["coverage"]["ratio"] == 1.0
    source, out = file_tensors(gpt_oss), file_tensors(tmp_path / "out")
    fused = [n for n in source if ".mlp.experts." in n]
    assert fused and all(raw(out[n]) == raw(source[n]) for n in fused)
    assert "model.layers.0.mlp.router" in json.loads((tmp_path / "out" / "config.json").read_text())[
        "quantization_config"]["ignore"]


def test_falcon_linear_is_quantized_as_a_linear(tmp_path):
    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=512)
    folder = save(tmp_path, "falcon", config)
    report = calib.run(model=str(folder), recipe="fp8-dynamic", output=tmp_path / "out", progress=False)
    out = file_tensors(tmp_path / "out")
    assert report["layers_quantized"] == 8 and report["coverage"]["ratio"] == 1.0
    assert out["transformer.h.0.self_attention.query_key_value.weight"].dtype == torch.float8_e4m3fn


def test_kv_cache_scales_are_refused_for_latent_attention(moe_models, tmp_path):
    with pytest.raises(CalibInputError, match="multi-head latent attention"):
        calib.run(model=str(moe_models["deepseek_v3"]), recipe="fp8-static-kv", output=tmp_path / "out", **RUN)
    assert not (tmp_path / "out").exists()


def test_gptq_solves_every_expert_and_rounds_a_starved_one_to_nearest_reported(starved, tmp_path):
    """GPTQ on DeepSeek-V3 experts: each expert's Hessian comes from the tokens routed to it; the expert no token
    reaches has none, is rounded to nearest on its siblings' scales and is named in the report; in memory and
    layer by layer write the same bytes."""
    import json

    report = calib.run(model=str(starved), recipe="fp8-static-gptq", output=tmp_path / "mem", mode="in-memory", **RUN)
    calib.run(model=str(starved), recipe="fp8-static-gptq", output=tmp_path / "seq", mode="sequential", **RUN)
    ta, tb = file_tensors(tmp_path / "mem"), file_tensors(tmp_path / "seq")
    assert set(ta) == set(tb) and all(raw(ta[n]) == raw(tb[n]) for n in ta)
    gptq = json.loads((tmp_path / "mem" / "calib_report.json").read_text())["gptq"]
    expert = "model.layers.1.mlp.experts.3"
    starved_members = sorted(f"{expert}.{p}" for p in ("down_proj", "gate_proj", "up_proj"))
    assert sorted(gptq["rounded_to_nearest"]) == starved_members
    assert all("no calibration tokens" in why for why in gptq["rounded_to_nearest"].values())
    assert gptq["layers_solved"] + len(starved_members) == report["layers_quantized"]
    assert gptq["mean_output_error"] < 0.85 * gptq["mean_output_error_round_to_nearest"]
    # the dense layer 0 runs in order in one pass; the MoE layer, whose experts see a batch zero or several
    # times, in two (calib.in_order), and the report says why
    assert gptq["in_order_layers"] == 1 and list(gptq["two_pass_layers"]) == ["model.layers.1"]
    assert "model.layers.1.mlp." in gptq["two_pass_layers"]["model.layers.1"]
    assert ta[f"{expert}.gate_proj.weight"].dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_every_expert_is_smoothed_up_to_down_and_both_modes_write_it_alike(family, moe_models, tmp_path):
    """SmoothQuant in an MoE layer: each routed expert's up -> down under the
    checkpoint's names (Mixtral's w3 -> w2) and the shared expert's; the model keeps
    its function, and the sequential writer's transforms of the per-expert source
    tensors give the in-memory checkpoint, bit for bit."""
    up = "w3" if family == "mixtral" else "up_proj"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(moe_models[family])).eval()
    with torch.no_grad():
        before = model(IDS).logits
    recipe = calib.load_recipe("int8-w8a8-static")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(moe_models[family]))
    data = build_calibration_set(tokenizer, TINYSTORIES_TEXT, num_samples=6, seq_len=48)
    cal = calib.calibrate(model, recipe, data, batch_size=3, progress=False)
    with torch.no_grad():
        after = model(IDS).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    experts = [p for p in cal.smoothing if ".experts." in p]
    assert sorted(experts) == sorted(f"model.layers.{i}.mlp.experts.{e}.{up}" for i in range(2) for e in range(4))
    if family == "qwen2_moe":
        assert "model.layers.1.mlp.shared_expert.up_proj" in cal.smoothing
    kwargs = dict(model=str(moe_models[family]), recipe="int8-w8a8-static", dataset=str(TINYSTORIES_TEXT), **RUN)
    whole = calib.run(output=tmp_path / "whole", mode="in-memory", **kwargs)
    seq = calib.run(output=tmp_path / "seq", mode="sequential", **kwargs)
    assert whole["smoothquant_pairs"] == seq["smoothquant_pairs"] == len(cal.smoothing)
    ta, tb = file_tensors(tmp_path / "whole"), file_tensors(tmp_path / "seq")
    assert set(ta) == set(tb) and all(raw(ta[n]) == raw(tb[n]) for n in ta)
