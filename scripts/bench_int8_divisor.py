#!/usr/bin/env python
"""INT8 symmetric scale: amax/127 (calib) vs amax/127.5 (compressed-tensors).

For every Linear weight of a real model, per-channel INT8 quantization both
ways: mean SQNR, and held-out perplexity with the weights replaced by their
dequantized values (weight-only, so only the divisor differs).

    python scripts/bench_int8_divisor.py [--model DIR] [--text FILE]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from calib import qmath  # noqa: E402
from calib.evaluate import perplexity  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def fake_quant(w: torch.Tensor, divisor: float) -> torch.Tensor:
    scale = qmath.symmetric_scale(w.abs().amax(dim=1, keepdim=True), divisor)
    return qmath.dequantize(qmath.quantize_int(w, scale, qmin=-128, qmax=127), scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "tinystories-llama-263k"))
    parser.add_argument("--text", default=str(SHARED / "data" / "tinystories" / "tinystories_val.txt"))
    args = parser.parse_args()
    text = Path(args.text).read_text()
    heldout = text[int(len(text) * 0.9):]
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    print("| divisor | mean weight SQNR (dB) | clipped weights | held-out PPL |\n|---|---|---|---|")
    base = transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
    print(f"| fp32 | - | - | {perplexity(base, tok, heldout):.4f} |")
    for divisor in (127.0, 127.5):
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model).eval()
        sqnrs, clipped = [], 0
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    w = module.weight.detach().clone()
                    dq = fake_quant(w, divisor)
                    sqnrs.append(qmath.sqnr_db(w, dq))
                    clipped += int(((w - dq).abs() > qmath.symmetric_scale(
                        w.abs().amax(dim=1, keepdim=True), divisor) / 2 + 1e-12).sum())
                    module.weight.copy_(dq)
        ppl = perplexity(model, tok, heldout)
        print(f"| amax/{divisor:g} | {sum(sqnrs) / len(sqnrs):.3f} | {clipped} | {ppl:.4f} |")


if __name__ == "__main__":
    main()
