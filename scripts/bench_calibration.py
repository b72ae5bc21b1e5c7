#!/usr/bin/env python
"""Calibration overhead: calib's calibration pass vs a plain forward pass.

For each model, in one process: a plain forward over the calibration set
(``model(**batch)``, no cache, full logits: what a user's own loop does), the
same forward with calib's forward arguments but no hooks, then calib's
calibration pass with the min-max and with the percentile observer, then with
GPTQ (fp8-static + GPTQ, and int8-w8a8-gptq: SmoothQuant + GPTQ, in order in one pass
a layer and, for comparison, in two passes and with every SmoothQuant alpha of the grid
scored instead of the downhill walk). Each model
runs in its own subprocess so peak RSS is per model. Ratios are taken within
one process, side by side, since machines are noisy.

    python scripts/bench_calibration.py                 # ~400M random Llama + SmolLM2, 64 x 512
    python scripts/bench_calibration.py --quick         # ~100M random Llama + SmolLM2, 8 x 512
    python scripts/bench_calibration.py --model PATH --samples 32 --seq-len 256 --json out.json
    python scripts/bench_calibration.py --model random-llama-400m --only minmax --only GPTQ   # some rows only

Columns: plain_forward_s, calibrate_s, ratio = calibrate_s / plain_forward_s,
hook_ratio = calibrate_s / (same forward args without hooks), peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RANDOM_LLAMAS = {
    # name: (hidden, layers, intermediate, heads, kv_heads); vocab 49152 (SmolLM2's)
    "random-llama-400m": (1024, 18, 4096, 16, 8),
    "random-llama-100m": (768, 6, 2048, 12, 4),
}


def build_model(name: str):
    import torch
    import transformers

    if name in RANDOM_LLAMAS:
        hidden, layers, inter, heads, kv = RANDOM_LLAMAS[name]
        config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                                          num_attention_heads=heads, num_key_value_heads=kv, vocab_size=49152,
                                          max_position_embeddings=4096, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        return model, None
    from calib.models import load_model

    loaded = load_model(None if name == "smollm2-135m" else name)
    return loaded.model, loaded.tokenizer


def calibration_set(tokenizer, vocab: int, samples: int, seq_len: int):
    import torch

    from calib.data import CalibrationSet, build_calibration_set

    if tokenizer is not None:
        return build_calibration_set(tokenizer, None, num_samples=samples, seq_len=seq_len, packed=True)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (seq_len,), generator=gen) for _ in range(samples)]
    return CalibrationSet(samples=ids, source="random token ids", seq_len=seq_len, packed=True, seed=0)


def bench_one(name: str, samples: int, seq_len: int, batch_size: int, only: list[str] | None = None) -> list[dict]:
    import torch

    import calib
    from calib.hooks import ObservationSession
    from calib.calibration import _forward_kwargs
    from calib.quantize import plan_for

    torch.set_grad_enabled(False)
    model, tokenizer = build_model(name)
    params = sum(p.numel() for p in model.parameters())
    data = calibration_set(tokenizer, model.config.vocab_size, samples, seq_len)
    if len(data.samples) < samples:
        print(f"note: {name}: only {len(data.samples)} samples of {seq_len} tokens available", file=sys.stderr)
    batches = list(data.batches(batch_size, pad_token_id=0))

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def plain():
        with torch.inference_mode():
            for batch in batches:
                model(**batch, use_cache=False)

    recipes = {}
    for observer in ("minmax", "percentile"):
        base = calib.load_recipe("fp8-static")
        acts = base.input_activations.model_copy(update={"observer": observer})
        recipes[observer] = base.model_copy(update={"input_activations": acts})
    # GPTQ (layer by layer, in order in one pass a layer), then SmoothQuant + GPTQ, which rescales the
    # model in place: last (its two-pass row runs on the model the first smoothed: the same function
    # and the same work, so the same time).
    recipes["fp8-static + GPTQ"] = calib.load_recipe("fp8-static").model_copy(
        update={"gptq": calib.recipe.GPTQArgs()})
    recipes["int8-w8a8-gptq (SmoothQuant + GPTQ)"] = calib.load_recipe("int8-w8a8-gptq")
    two_pass = calib.load_recipe("int8-w8a8-gptq")
    recipes["int8-w8a8-gptq, GPTQ in two passes (true_sequential: false)"] = two_pass.model_copy(
        update={"gptq": two_pass.gptq.model_copy(update={"true_sequential": False})})
    recipes["int8-w8a8-gptq, every alpha of the grid scored (search: full)"] = two_pass.model_copy(
        update={"smoothquant": two_pass.smoothquant.model_copy(update={"search": "full"})})
    if only:
        recipes = {label: r for label, r in recipes.items() if any(word in label for word in only)}
    lean_kwargs = _forward_kwargs(model, plan_for(model, calib.load_recipe("fp8-static")), False, ObservationSession())

    def lean():
        with torch.inference_mode():
            for batch in batches:
                model(**batch, **lean_kwargs)

    plain()  # warm-up: allocator, kernels, caches
    # One pass each, back to back in this process: plain, lean, then calibration
    # with each observer (the same batches every time).
    t_plain = timed(plain)
    t_lean = timed(lean)
    results = []
    for observer, recipe in recipes.items():
        cal = calib.calibrate(model, recipe, data, batch_size=batch_size, progress=False)
        results.append({
            "model": name, "params_m": round(params / 1e6, 1), "observer": observer,
            "samples": len(data.samples), "seq_len": seq_len, "batch_size": batch_size,
            "plain_forward_s": round(t_plain, 3), "lean_forward_s": round(t_lean, 3),
            "calibrate_s": round(cal.seconds, 3),
            "ratio": round(cal.seconds / t_plain, 3), "hook_ratio": round(cal.seconds / t_lean, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads": torch.get_num_threads(),
        })
    return results


def table(rows: list[dict]) -> str:
    head = ("| model | params (M) | observer / recipe | samples x seq | plain forward (s) | calibrate (s) | ratio "
            "| hook-only ratio | peak RSS (MB) |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_m']} | {r['observer']} | {r['samples']} x {r['seq_len']} | "
                     f"{r['plain_forward_s']:.2f} | {r['calibrate_s']:.2f} | {r['ratio']:.3f} | "
                     f"{r['hook_ratio']:.3f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model name/path (repeatable); default: a random "
                        "Llama and smollm2-135m")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="~100M random Llama, 8 x 512")
    parser.add_argument("--only", action="append", help="run only the rows whose label contains this (repeatable: "
                        "minmax, percentile, GPTQ, SmoothQuant)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--_single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    samples = args.samples or (8 if args.quick else 64)

    if args._single:
        print(json.dumps(bench_one(args._single, samples, args.seq_len, args.batch_size, args.only)))
        return 0

    models = args.model or ["random-llama-100m" if args.quick else "random-llama-400m", "smollm2-135m"]
    rows = []
    for name in models:
        cmd = [sys.executable, __file__, "--_single", name, "--samples", str(samples), "--seq-len",
               str(args.seq_len), "--batch-size", str(args.batch_size)]
        for word in args.only or []:
            cmd += ["--only", word]
        print(f"benchmarking {name} ({samples} x {args.seq_len}) ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"{name}: failed (exit {proc.returncode})", file=sys.stderr)
            continue
        rows.extend(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"results": rows}, handle, indent=2)
    return 0 if rows else 1


if __name__ == "__main__":
    raise SystemExit(main())
