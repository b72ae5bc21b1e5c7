#!/usr/bin/env python
"""Quality of every bundled recipe, evaluated three ways, with calibration time.

For each model and recipe: ``calib run`` (the default calibration data unless
``--dataset``), then ``calib eval`` on held-out text (default: the packaged
WikiText-2 test, which calib never calibrates on) with three backends:

* ``served``: computed as vLLM serves the checkpoint (calib.emulate);
* ``weights``: weights dequantized, activations and KV cache in float;
* ``transformers``: transformers + compressed-tensors reading the folder.

Checkpoints made by another tool (llm-compressor: ``scripts/llmcompressor_reference.py``
in its own venv) are evaluated the same way when ``--other DIR`` holds folders
named ``<model>-<recipe>`` (e.g. ``smollm2-135m-fp8-static``).

    python scripts/bench_quality.py                                  # SmolLM2, every bundled recipe
    python scripts/bench_quality.py --model ../shared/models/tinystories-llama-263k \\
        --dataset ../shared/data/tinystories/tinystories_val.txt --seq-len 128 --eval-seq-len 128
    python scripts/bench_quality.py --recipe fp8-static --recipe fp8-static-gptq --json quality.json

Columns: PPL ÷ the original's, per backend (encoders: embedding cosine); the
mean per-token KL divergence from the original's next-token distribution per
backend (causal LMs); calibrate_s (calib's calibration
stage: forwards, observers, SmoothQuant, GPTQ) and total_s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKENDS = ("calib", "weights", "transformers")


def short_name(model: str | None) -> str:
    return "smollm2-135m" if model is None else Path(model).name


def recipe_name(recipe: str) -> str:
    """A bundled recipe's name, or a recipe file's stem (``my/int8-sq.yaml`` -> ``int8-sq``)."""
    return Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe


def bench(model: str | None, recipes: list[str], args, workdir: Path) -> list[dict]:
    import calib
    from calib.quality import evaluate

    rows = []
    for recipe in recipes:
        out = workdir / f"{short_name(model)}-{recipe_name(recipe)}"
        start = time.perf_counter()
        report = calib.run(model=model, recipe=recipe, dataset=args.dataset, output=out, overwrite=True,
                           num_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                           progress=False)
        total = time.perf_counter() - start
        rows.append(_evaluated(model, out, recipe, "calib", args, evaluate) | {
            "calibrate_s": report["timings_s"]["calibrate"], "total_s": round(total, 1)})
        print(_row(rows[-1]), file=sys.stderr, flush=True)
    other = Path(args.other) if args.other else None
    for recipe in recipes:
        folder = other / f"{short_name(model)}-{recipe_name(recipe)}" if other else None
        if folder is not None and (folder / "config.json").is_file():
            rows.append(_evaluated(model, folder, recipe, other.name, args, evaluate))
            print(_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _evaluated(model, folder: Path, recipe: str, tool: str, args, evaluate) -> dict:
    result = evaluate(model, str(folder), args.eval_dataset, seq_len=args.eval_seq_len, max_tokens=args.max_tokens,
                      backends=BACKENDS, progress=False)
    row = {"model": short_name(model), "recipe": recipe_name(recipe), "tool": tool, "metric": result["metric"],
           "samples": args.samples, "seq_len": args.seq_len, "eval": result["dataset"],
           "original": result["original_value"]}
    for backend in BACKENDS:  # PPL ÷ the original's; for encoders the mean embedding cosine
        entry = result["backends"][backend]
        row[backend] = entry["ratio"] if result["metric"] == "perplexity" else entry["value"]
        row[f"{backend}_kl"] = entry.get("kl_per_token")  # KL(original || quantized) per token, causal LMs
    return row


def _row(r: dict) -> str:
    def cell(v, digits=4):
        return f"{v:.{digits}f}" if isinstance(v, float) else "–"

    return (f"| {r['model']} | {r['recipe']} | {r['tool']} | {cell(r['calib'])} | {cell(r['weights'])} | "
            f"{cell(r['transformers'])} | {cell(r.get('calib_kl'), 5)} | {cell(r.get('weights_kl'), 5)} | "
            f"{cell(r.get('transformers_kl'), 5)} | {r.get('calibrate_s', '–')} | {r.get('total_s', '–')} |")


def table(rows: list[dict]) -> str:
    head = ("| model | recipe | tool | served (÷ original) | weights only | transformers + CT | KL served | "
            "KL weights | KL transformers | calibrate (s) | total (s) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head] + [_row(r) for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model (repeatable); default: the embedded SmolLM2")
    parser.add_argument("--recipe", action="append", help="recipe (repeatable); default: every bundled recipe")
    parser.add_argument("--dataset", help="calibration data (default: calib's own texts)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-dataset", help="held-out text (default: WikiText-2 test, packaged)")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--other", help="folder of another tool's checkpoints named <model>-<recipe>")
    parser.add_argument("--workdir", default="../calib-bench/quality", help="where checkpoints are written")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    import calib

    recipes = args.recipe or sorted(calib.bundled_recipes())
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.model or [None]:
        rows.extend(bench(model, recipes, args, workdir))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
