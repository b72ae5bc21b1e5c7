#!/usr/bin/env python
"""What quantizing the activations alone costs: the floor no weight rounding can beat.

Two measurements, PPL ÷ the float model's on held-out text (``calib eval``'s windows:
the packaged WikiText-2 test unless ``--dataset``):

* ``--floor`` (default): the float model with every targeted Linear's input
  fake-quantized **per token, dynamically** (each token's own amax: the best scale a
  per-tensor or per-token scheme can have), FP8 E4M3 and INT8, weights untouched; also
  with one kind of projection left in float, to show which inputs cost what.
* ``--checkpoint DIR``: a quantized checkpoint computed as served (``calib.emulate``),
  then with its activation quantizers removed (the weights' cost), then with them on
  one kind of projection only.

    python scripts/bench_activation_floor.py                       # the embedded SmolLM2
    python scripts/bench_activation_floor.py --checkpoint ../calib-bench/quality/smollm2-135m-int8-w8a8-gptq

Prints a markdown table (and ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}


def _linears(model, leaves: tuple[str, ...] | None):
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head" and \
                (leaves is None or name.rsplit(".", 1)[-1] in leaves):
            yield module


def _quantizing(model, args, leaves=None) -> list:
    from calib.emulate import _activation_hook

    return [m.register_forward_pre_hook(_activation_hook(args, None, None)) for m in _linears(model, leaves)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the float model (default: the embedded SmolLM2)")
    parser.add_argument("--checkpoint", help="a quantized checkpoint of --model: its served cost, split")
    parser.add_argument("--dataset", help="held-out text (default: the packaged WikiText-2 test)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    from calib.emulate import load_served
    from calib.evaluate import window_nll
    from calib.models import load_model
    from calib.quality import _windows, eval_text
    from calib.recipe import QuantArgs

    loaded = load_model(args.model, dtype="float32")
    text, text_name = eval_text(args.dataset)
    windows = _windows(loaded.tokenizer, text, args.seq_len, args.max_tokens)

    def ppl(model) -> float:
        nll, count = window_nll(model, windows, 4)
        return math.exp(nll / count)

    base = ppl(loaded.model)
    rows: list[tuple[str, float]] = []
    if args.checkpoint is None:
        for label, qargs in (("FP8", QuantArgs(num_bits=8, type="float", strategy="token", dynamic=True)),
                             ("INT8", QuantArgs(num_bits=8, type="int", strategy="token", dynamic=True))):
            for kind, leaves in [("all", None)] + [(f"all but {k}", tuple(x for kk, v in KINDS.items() if kk != k
                                                                         for x in v)) for k in KINDS]:
                handles = _quantizing(loaded.model, qargs, leaves)
                rows.append((f"{label} per-token activations on {kind}, float weights", ppl(loaded.model) / base))
                for h in handles:
                    h.remove()
                print(f"| {rows[-1][0]} | {rows[-1][1]:.4f} |", flush=True)
    else:
        del loaded
        served = load_served(args.checkpoint)
        rows.append(("served", ppl(served.model) / base))
        acts = served.recipe.input_activations
        served.remove_hooks()
        rows.append(("weights only", ppl(served.model) / base))
        if acts is not None and acts.dynamic:
            for kind, leaves in KINDS.items():
                handles = _quantizing(served.model, acts, leaves)
                rows.append((f"weights + activations of {kind}", ppl(served.model) / base))
                for h in handles:
                    h.remove()
        for row in rows:
            print(f"| {row[0]} | {row[1]:.4f} |", flush=True)
    print(f"\n{text_name}, {windows.shape[0]} x {windows.shape[1]} tokens, float PPL {base:.4f}\n")
    print("| what | PPL ÷ float |\n|---|---|")
    for what, ratio in rows:
        print(f"| {what} | {ratio:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"float_ppl": base, "rows": dict(rows)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
