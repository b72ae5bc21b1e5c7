#!/usr/bin/env python
"""Write a random-init Hugging Face model of any size to disk, shard by shard,
never holding the whole model in memory (one tensor at a time).

    python scripts/make_random_model.py OUT --preset llama2-7b --dtype bfloat16
    python scripts/make_random_model.py OUT --preset llama-1b

Used by the scale benchmarks: quantizing a 7B model on a 24 GiB machine is the
point, so the model cannot be built in memory first. Weights are normal with
the config's ``initializer_range`` (norm weights 1, biases 0), seeded, and
the folder gets config.json, the safetensors shards + index, and the tokenizer
of the shared tiny Llama (a real tokenizer; its ids fit any vocabulary >= 512).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CALIB_SHARED", ROOT.parent / "shared"))

PRESETS = {
    # Llama-2-7B's shapes: 6.74B parameters, 13.5 GB in bf16.
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    # A ~1.1B Llama (TinyLlama's shapes, GQA).
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    # A ~400M Llama (SmolLM2's vocabulary; the distributed and calibration benchmarks' shapes).
    "llama-400m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=18, num_attention_heads=16,
                       num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096),
    # A ~250M Llama for quick runs.
    "llama-250m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}


def write_random_model(out: Path, preset: str, dtype: torch.dtype, shard_bytes: int = 2 * 10**9,
                       seed: int = 0) -> dict:
    """Create the model folder; returns {"params": n, "bytes": b, "seconds": s}."""
    import transformers

    from calib.export import save_safetensors

    start = time.perf_counter()
    config = transformers.LlamaConfig(**PRESETS[preset], tie_word_embeddings=False,
                                      dtype=str(dtype).removeprefix("torch."))
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    shards, shard, size, total, params = [], {}, 0, 0, 0

    def flush():
        nonlocal shard, size
        if shard:
            name = f"shard-{len(shards):05d}.tmp"
            save_safetensors(shard, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(shard)))
            shard, size = {}, 0

    for name, param in skeleton.named_parameters():
        if name.endswith("norm.weight"):
            tensor = torch.ones(param.shape, dtype=dtype)
        elif name.endswith(".bias"):
            tensor = torch.zeros(param.shape, dtype=dtype)
        else:
            tensor = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
        total += nbytes
        params += tensor.numel()
    flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SHARED / "models" / "tinystories-llama-263k" / name, out / name)
    return {"params": params, "bytes": total, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--shard-size", type=float, default=2.0, help="GB per shard (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = write_random_model(args.out, args.preset, getattr(torch, args.dtype), int(args.shard_size * 10**9),
                              args.seed)
    print(json.dumps({"folder": str(args.out), **info}))


if __name__ == "__main__":
    main()
