"""The ``calib`` command.

Exit codes: 0 success; 2 bad input (one paragraph naming the cause and the fix,
no traceback unless ``--debug``); 1 anything unexpected.
"""

from __future__ import annotations

import argparse
import logging
import sys

from calib.errors import CalibInputError

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="calib", description="Post-training quantization calibration: "
                                     "calibrate, quantize and export FP8/INT8 checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="calibrate + quantize + export a model",
                         description="Calibrate, quantize and export. With no --model/--dataset: the embedded "
                         "SmolLM2-135M-Instruct on calib's own calibration texts.")
    run.add_argument("--model", default=None,
                     help="model folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    run.add_argument("--recipe", default="fp8-static", help="bundled recipe name or YAML path (default fp8-static)")
    run.add_argument("--dataset", default=None,
                     help="hub dataset (name or name:config) or local .txt/.jsonl/.json/.parquet file or folder "
                     "(default: calib's packaged calibration texts)")
    run.add_argument("--text-column", default="text", help="text column of the dataset (default text)")
    run.add_argument("--split", default="train", help="dataset split for hub datasets (default train)")
    run.add_argument("--num-samples", type=int, default=None, help="calibration samples (default: recipe's)")
    run.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default: recipe's)")
    run.add_argument("--batch-size", type=int, default=None, help="samples per forward (default: recipe's)")
    run.add_argument("--packing", choices=["auto", "pack", "rows"], default="auto",
                     help="pack documents into seq-len windows, or one sample per row (auto: pack for LMs)")
    run.add_argument("--seed", type=int, default=0, help="seed for sample selection (default 0)")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="dtype to load the model in (default: the checkpoint's)")
    run.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    run.add_argument("--output", default="calib-out", help="output directory (default ./calib-out)")
    run.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    run.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    sub.add_parser("recipes", help="list the bundled recipes")
    return parser


def _print_summary(report: dict) -> None:
    t = report["timings_s"]
    before, after = report["size_before_bytes"], report["size_after_bytes"]
    lines = [
        f"calib {report['calib_version']}: {report['model']} -> {report['output']}",
        f"  recipe      {report['recipe']} (format {report['format']})",
        f"  data        {report['dataset'] or 'none needed'}: {report['num_samples']} samples, "
        f"{report['calibration_tokens']} tokens",
        f"  layers      {report['layers_quantized']} quantized",
        f"  size        {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({after / max(before, 1):.2f}x)",
        f"  time        load {t['load']:.1f}s, data {t['data']:.1f}s, calibrate {t['calibrate']:.1f}s, "
        f"quantize {t['quantize']:.1f}s, export {t['export']:.1f}s, total {t['total']:.1f}s",
        f"  peak memory {report['peak_rss_mb']:.0f} MiB RSS",
    ]
    if report.get("unobserved_modules"):
        lines.append(f"  note        {len(report['unobserved_modules'])} modules saw no tokens (sibling range used)")
    if report.get("nonfinite_values_dropped"):
        lines.append(f"  note        {report['nonfinite_values_dropped']} NaN/Inf activation values were ignored")
    lines.append(f"  report      {report['output']}/calib_report.json")
    print("\n".join(lines))


def _list_recipes() -> None:
    from calib.recipe import bundled_recipes, load_recipe

    for name, path in bundled_recipes().items():
        recipe = load_recipe(path)
        print(f"{name:20s} {recipe.format:16s} {' '.join(recipe.description.split())[:90]}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:
        for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.command == "recipes":
            _list_recipes()
            return EXIT_OK
        from calib.pipeline import run

        report = run(
            model=args.model, recipe=args.recipe, dataset=args.dataset, output=args.output,
            text_column=args.text_column, split=args.split, num_samples=args.num_samples,
            seq_len=args.seq_len, batch_size=args.batch_size, packing=args.packing, seed=args.seed,
            dtype=args.dtype, device=args.device, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, progress=not args.no_progress,
        )
        _print_summary(report)
        return EXIT_OK
    except CalibInputError as exc:
        if args.debug:
            raise
        print(f"calib: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("calib: interrupted; no checkpoint was written", file=sys.stderr)
        return 130
    except Exception:
        if args.debug:
            raise
        logging.getLogger("calib").exception("unexpected error (please report it with the traceback above)")
        return EXIT_BUG


if __name__ == "__main__":
    raise SystemExit(main())
