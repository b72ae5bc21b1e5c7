#!/usr/bin/env python
"""MoE benchmark: a Mixtral-shaped and a Qwen3-MoE-shaped random-init model
(~2B parameters each by default), fp8-static in sequential mode, with and without
--moe-calibrate-all-experts. Reports wall time, the child's peak RSS, coverage,
and the tokens the router sent to each expert; writes a markdown table.

    .venv/bin/python scripts/bench_moe.py --workdir ../calib-bench            # the ~2B models
    .venv/bin/python scripts/bench_moe.py --workdir ../calib-bench --size tiny # a quick check of the script

Random-init routers spread tokens more evenly than trained ones, so the token
counts show the mechanics (every expert reached, padding excluded), not the
skew of a real model. Calibration: WikiText-2 test, 32 x 512 tokens (as bench_scale).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import GiB, calib_cmd, folder_bytes, timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CALIB_SHARED", ROOT.parent / "shared"))

SIZES = {
    # ~1.95B parameters: 22 layers of 8 experts (top-2), hidden 1024, expert width 3584.
    "2b": {
        "mixtral": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=22, num_attention_heads=16,
                        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                        max_position_embeddings=4096),
        # ~2.1B: 40 layers of 64 experts (top-8), hidden 1024, expert width 256.
        "qwen3_moe": dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=256, num_hidden_layers=40,
                          num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64,
                          num_experts_per_tok=8, vocab_size=32000, max_position_embeddings=4096),
    },
}
# The same shapes, small: a quick check of the script.
SIZES["tiny"] = {
    "mixtral": {**SIZES["2b"]["mixtral"], "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen3_moe": {**SIZES["2b"]["qwen3_moe"], "hidden_size": 128, "intermediate_size": 256,
                  "moe_intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 32, "num_experts": 16, "num_experts_per_tok": 4},
}


def ensure_model(workdir: Path, family: str, size: str) -> Path:
    """The model folder, written by a child process: a forked child's peak RSS
    (what the table reports) starts from its parent's, so this process stays small."""
    folder = workdir / f"{family}-{size}"
    if not (folder / "config.json").is_file():
        print(f"writing the random-init {family} ({size}) model to {folder} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--size", size, "--make", family],
                       check=True)
    return folder


def make_model(folder: Path, family: str, size: str) -> None:
    import transformers

    cls = {"mixtral": transformers.MixtralConfig, "qwen3_moe": transformers.Qwen3MoeConfig}[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**SIZES[size][family]), dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="2GB")
    transformers.AutoTokenizer.from_pretrained(str(SHARED / "models" / "tinystories-llama-263k")).save_pretrained(folder)


def run(model: Path, out: Path, all_experts: bool) -> dict:
    extra = ["--sequential"] + (["--moe-calibrate-all-experts"] if all_experts else [])
    if out.exists():
        shutil.rmtree(out)
    result = timed(calib_cmd(model, out, "fp8-static", *extra), env=dict(os.environ, HF_HUB_OFFLINE="1"),
                   log=out.parent / f"{out.name}.log")
    report = json.loads((out / "calib_report.json").read_text())
    counts = [n for c in report["moe"]["tokens_per_expert"].values() for n in c]
    result.update(checkpoint_bytes=folder_bytes(out), coverage=report["coverage"]["ratio"],
                  experts=report["moe"]["experts"], tokens_min=min(counts), tokens_max=max(counts),
                  few=len(report["moe"]["experts_with_few_tokens"]),
                  without=len(report["moe"]["experts_without_tokens"]),
                  observed_min=min(layer["observed_tokens"] or 0 for layer in report["layers"]
                                   if ".experts." in layer["name"]),
                  calibrate_s=report["timings_s"]["calibrate"])
    shutil.rmtree(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--size", choices=list(SIZES), default="2b")
    parser.add_argument("--families", nargs="+", default=["mixtral", "qwen3_moe"])
    parser.add_argument("--make", choices=["mixtral", "qwen3_moe"], help=argparse.SUPPRESS)  # ensure_model's child
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.make:
        make_model(args.workdir / f"{args.make}-{args.size}", args.make, args.size)
        return
    rows = ["| model | all experts | wall (s) | calibrate (s) | peak RSS (GiB) | coverage | experts | routed tokens "
            "per expert min / max | few / none | observed tokens per expert, min |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for family in args.families:
        model = ensure_model(args.workdir, family, args.size)
        for all_experts in (False, True):
            r = run(model, args.workdir / f"out-{family}", all_experts)
            rows.append(f"| {family} ({args.size}) | {'yes' if all_experts else 'no'} | {r['wall_s']:.0f} | "
                        f"{r['calibrate_s']:.0f} | {r['peak_rss_bytes'] / GiB:.2f} | {r['coverage']:.0%} | "
                        f"{r['experts']} | {r['tokens_min']} / {r['tokens_max']} | {r['few']} / {r['without']} | "
                        f"{r['observed_min']} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    (args.workdir / f"bench_moe_{args.size}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
