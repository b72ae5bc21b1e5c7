#!/usr/bin/env python
"""FP8 per-tensor weight scale choices, weights only, on one model.

    python scripts/bench_fp8_weight_scales.py                      # embedded SmolLM2, 32 x 512 WikiText-2 test tokens
    python scripts/bench_fp8_weight_scales.py --model tinystories  # ../shared TinyStories Llama, held-out 128 x 128

Every targeted Linear (all but the LM head) is quantized in place to FP8 E4M3
with one scale per tensor and dequantized; activations stay in float, so the
PPL / FP32 PPL printed per row is what the weights alone cost. Rows:

- ``shared``: one scale per fused group (q/k/v, gate/up) = the group's max /
  448, one rounding (calib's fp8-static).
- ``per shard``: each projection its own max / 448 (llm-compressor's
  checkpoint as transformers reads it).
- ``per shard, re-quantized to the group's max``: the same after vLLM's load,
  which dequantizes each shard and rounds it again with the largest scale.
- ``<rule> x c``: the rule's scales multiplied by ``c`` (c < 1 clips the
  largest weights; c > 1 leaves FP8's top unused): how much the result moves
  with the scale alone. Averaged over several ``c``, a rule's rows compare
  rules over many rounding draws rather than one.
- ``search: ...``: per fused group, the multiple of the shared scale in
  [0.75, 1.05] that minimises a weight error (plain squared error, or squared
  error weighted per input channel by the calibration inputs' mean x^2, i.e.
  the diagonal of the layer's Hessian X^T X: the output error a channel causes),
  or the layer's output error itself on the calibration inputs, tr(E H E^T)
  with the full H = X^T X / tokens.
"""

from __future__ import annotations

import argparse
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
from calib.data import build_calibration_set  # noqa: E402
from calib.evaluate import token_windows, window_logprobs, window_nll  # noqa: E402
from calib.models import load_model  # noqa: E402
from calib.quality import default_eval_text  # noqa: E402
from calib.emulate import fused_groups  # noqa: E402

FP8 = qmath.FP8_MAX


def targets(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def groups(names) -> list[list[str]]:
    """Fused groups (siblings that one GEMM serves, as calib's served computation finds them) and
    the other targets, each on its own."""
    fused = fused_groups(list(names))
    grouped = {n for group in fused for n in group}
    return fused + [[n] for n in names if n not in grouped]


def fake_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qmath.quantize_fp8(w, scale).to(torch.float32) * scale


@torch.no_grad()
def input_stats(model, calib_set, full: bool, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per target, over the calibration tokens: mean x^2 per input channel (the
    Hessian's diagonal / tokens), or with ``full`` the whole X^T X / tokens."""
    sums, counts, handles = {}, {}, []
    for name, module in targets(model).items():
        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x.T @ x if full else x.pow(2).sum(0))
            counts[name] = counts.get(name, 0) + x.shape[0]
        handles.append(module.register_forward_pre_hook(hook))
    for batch in calib_set.batches(batch_size, 0):
        model(**batch)
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def choose(model, how: str, power: dict | None) -> dict[str, torch.Tensor]:
    """name -> dequantized weight for the choice ``how``."""
    mods = targets(model)
    out = {}
    for group in groups(mods):
        ws = [mods[n].weight.detach().float() for n in group]
        amaxes = [w.abs().max() for w in ws]
        top = torch.stack(amaxes).max()
        shared = top / FP8
        rule, _, c = how.partition(" x ")
        c = float(c) if c else 1.0
        if rule == "shared":
            out.update({n: fake_fp8(w, shared * c) for n, w in zip(group, ws)})
        elif rule == "per shard":
            out.update({n: fake_fp8(w, a / FP8 * c) for n, w, a in zip(group, ws, amaxes)})
        elif rule == "per shard requant":
            top_c = torch.stack(amaxes).max() / FP8 * c
            out.update({n: fake_fp8(fake_fp8(w, a / FP8 * c), top_c) for n, w, a in zip(group, ws, amaxes)})
        elif rule == "per channel":
            out.update({n: fake_fp8(w, w.abs().amax(1, keepdim=True).clamp_min(1e-12) / FP8 * c)
                        for n, w in zip(group, ws)})
        elif how.startswith("search"):
            weighted, output = "weighted" in how, "output" in how
            best, best_err = None, float("inf")
            for c in torch.linspace(0.75, 1.05, 61) if not output else torch.linspace(0.85, 1.05, 41):
                err = 0.0
                for n, w in zip(group, ws):
                    e = fake_fp8(w, shared * c) - w
                    if output:  # sum over tokens of |x E^T|^2 = tr(E H E^T)
                        err += float(((e @ power["full"][n]) * e).sum())
                        continue
                    e2 = e.pow(2)
                    err += float((e2 * power["diagonal"][n]).sum() if weighted else e2.sum())
                if err < best_err:
                    best, best_err = float(c), err
            out.update({n: fake_fp8(w, shared * best) for n, w in zip(group, ws)})
        else:
            raise ValueError(how)
    return out


def double_rounding_stats(model) -> str:
    """What vLLM's re-quantization does to the shards whose own scale is not the group's largest:
    the fraction of their weights that differ from one rounding with the largest scale, and the
    squared error of each (relative to sum w^2)."""
    mods, total, differ, single, double, power = targets(model), 0, 0, 0.0, 0.0, 0.0
    for group in groups(mods):
        ws = [mods[n].weight.detach().float() for n in group]
        amaxes = [w.abs().max() for w in ws]
        top = torch.stack(amaxes).max()
        for w, a in zip(ws, amaxes):
            if len(group) < 2 or a == top:
                continue
            once, twice = fake_fp8(w, top / FP8), fake_fp8(fake_fp8(w, a / FP8), top / FP8)
            total += w.numel()
            differ += int((once != twice).sum())
            single += float((once - w).pow(2).sum())
            double += float((twice - w).pow(2).sum())
            power += float(w.pow(2).sum())
    return (f"shards below their group's largest scale: {total} weights, {differ / total:.1%} differ between one "
            f"rounding with the largest scale and two (own, then largest); squared error / sum w^2: one "
            f"{single / power:.3e}, two {double / power:.3e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tinystories"], default="smollm2")
    parser.add_argument("--only", action="append", help="run only rows whose label contains this (repeatable)")
    parser.add_argument("--windows", type=int, help="evaluation windows (default 32 x 512 / 128 x 128)")
    parser.add_argument("--calib-loss", type=int, metavar="N",
                        help="also print the PPL ratio on the first N calibration samples (does the calibration "
                        "text rank the choices as the held-out text does?)")
    parser.add_argument("--kl", action="store_true",
                        help="also print the mean per-token KL divergence from the FP32 model's next-token "
                        "distribution (kept in bf16; a fidelity measure that quantization noise cannot improve)")
    parser.add_argument("--scales", help="comma-separated multiples c for the '<rule> x c' rows")
    parser.add_argument("--rule", action="append", choices=["shared", "per shard", "per shard requant", "per channel"],
                        help="rules that get the '<rule> x c' rows (default: shared)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.model == "smollm2":
        loaded, text, seq, count = load_model(None, dtype="float32"), default_eval_text(), 512, 32
        calib_set = build_calibration_set(loaded.tokenizer, num_samples=64, seq_len=512)
    else:
        path = SHARED / "models" / "tinystories-llama-263k"
        loaded = load_model(str(path), dtype="float32")
        full = (SHARED / "data" / "tinystories" / "tinystories_val.txt").read_text(encoding="utf-8")
        text, seq, count = full[int(len(full) * 0.9):], 128, 128
        calib_set = build_calibration_set(loaded.tokenizer, num_samples=64, seq_len=128)
    model = loaded.model
    windows = token_windows(loaded.tokenizer, text, seq, args.windows or count)

    reference: list[torch.Tensor] = []

    def score() -> float:
        """PPL, and (with --kl) the mean per-token KL(FP32 || quantized) on the same windows."""
        nll, tokens, kl = 0.0, 0, 0.0
        for i, (batch, logp) in enumerate(window_logprobs(model, windows)):
            nll -= float(logp.gather(-1, batch[:, 1:, None]).sum())
            tokens += batch[:, 1:].numel()
            if args.kl:
                if len(reference) <= i:
                    reference.append(logp.to(torch.bfloat16))
                ref = reference[i].float()
                kl += float((ref.exp() * (ref - logp)).sum())
        score.kl = kl / tokens
        return math.exp(nll / tokens)

    calib_windows = None
    if args.calib_loss:
        full = [s for s in calib_set.samples if s.numel() == calib_set.seq_len][: args.calib_loss]
        calib_windows = torch.stack(full)

    def calib_score() -> float:
        nll, tokens = window_nll(model, calib_windows)
        return math.exp(nll / tokens)

    print(double_rounding_stats(model), flush=True)
    base = score()
    calib_base = calib_score() if calib_windows is not None else None
    multiples = (args.scales or "0.98,0.99,1.01,1.02,1.04").split(",")
    rules = ["shared", "per shard", "per shard requant", "per channel"]
    rows = [*rules, *[f"{rule} x {c}" for rule in (args.rule or ["shared"]) for c in multiples],
            "search: squared error", "search: weighted squared error", "search: output error"]
    if args.only:
        rows = [r for r in rows if any(o in r for o in args.only)]
    power = {}
    if any("weighted" in r for r in rows):
        power["diagonal"] = input_stats(model, calib_set, full=False)
    if any("output" in r for r in rows):
        power["full"] = input_stats(model, calib_set, full=True)
    originals = {n: m.weight.detach().clone() for n, m in targets(model).items()}
    extra = f" calibration text, first {args.calib_loss} samples ({calib_base:.4f}) |" if calib_base else ""
    extra += " KL(FP32 || quantized), nats/token |" if args.kl else ""
    print(f"| {args.model}: FP8 weight scale (weights only) | PPL / FP32 ({base:.4f}) |{extra}\n"
          f"|---|---|{'---|' * (bool(calib_base) + args.kl)}", flush=True)
    for label in rows:
        for name, w in choose(model, label, power).items():
            model.get_submodule(name).weight.copy_(w.to(originals[name].dtype))
        ratio = score() / base
        cell = f" {calib_score() / calib_base:.4f} |" if calib_base else ""
        cell += f" {score.kl:.5f} |" if args.kl else ""
        print(f"| {label} | {ratio:.4f} |{cell}", flush=True)
        for name, w in originals.items():
            model.get_submodule(name).weight.copy_(w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
