"""The ``calib`` command.

Exit codes: 0 success (every targeted weight was quantized); 2 bad input (one
paragraph naming the cause and the fix, no traceback unless ``--debug``);
1 anything unexpected (a bug: the traceback is printed); 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM). Interrupted runs leave nothing behind.

Importing this module is cheap: torch and transformers are imported only when
a command needs them, so ``--help``, ``--version``, ``recipes`` and recipe
errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap

from calib import __version__
from calib.errors import CalibInputError

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
MAX_ERROR_CHARS = 2000  # an error is one paragraph, never a wall of text (e.g. a YAML alias bomb)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``finally`` (temporary folders) runs."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the sub-command (`calib --debug run`, `calib run --debug`).
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks and debug logs")
    parser = argparse.ArgumentParser(prog="calib", parents=[debug],
                                     description="Post-training quantization calibration: "
                                     "calibrate, quantize and export FP8/INT8 checkpoints.")
    parser.add_argument("--version", action="version", version=f"calib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[debug], help="calibrate + quantize + export a model",
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
    run.add_argument("--num-samples", type=_positive_int, default=None,
                     help="calibration samples (default: the recipe's)")
    run.add_argument("--seq-len", type=_positive_int, default=None,
                     help="tokens per sample (default: the recipe's, capped at the model's context)")
    run.add_argument("--batch-size", type=_positive_int, default=None, help="samples per forward (default: recipe's)")
    run.add_argument("--packing", choices=["auto", "pack", "rows"], default="auto",
                     help="pack documents into seq-len windows, or one sample per row (auto: pack for LMs)")
    run.add_argument("--seed", type=int, default=0, help="seed for sample selection (default 0)")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="dtype to load the model in (default: the checkpoint's)")
    run.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    run.add_argument("--output", default="calib-out", help="output directory (default ./calib-out)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --output")
    run.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    run.add_argument("--trust-remote-code", action="store_true",
                     help="run the model's own Python code (auto_map); only for code you trust")
    run.add_argument("--allow-pickle", action="store_true",
                     help="also read pickle weights (pytorch_model.bin); only for files you trust")
    run.add_argument("--max-memory", default=None,
                     help="memory budget, e.g. 16GB (default: 80%% of the memory available at start)")
    how = run.add_mutually_exclusive_group()
    how.add_argument("--sequential", dest="mode", action="store_const", const="sequential", default="auto",
                     help="calibrate one decoder layer at a time from the safetensors shards (default: when the "
                     "estimated in-memory peak exceeds --max-memory)")
    how.add_argument("--in-memory", dest="mode", action="store_const", const="in-memory",
                     help="load the whole model (never sequential or data-free streaming)")
    run.add_argument("--moe-calibrate-all-experts", action="store_true",
                     help="MoE models: run every calibration token through every expert for observation only (the "
                     "layer's output still follows the router), so rarely routed experts get well-founded input "
                     "scales; costs about experts/top-k times the experts' calibration compute (recipe field "
                     "calibration.moe_calibrate_all_experts)")
    run.add_argument("--dry-run", action="store_true",
                     help="print parameters, the layers quantized, calibration tokens, estimated checkpoint size and "
                     "memory peak, and warnings; read no weight and write nothing")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (calib's, datasets', "
                     "transformers')")

    ev = sub.add_parser("eval", parents=[debug], help="quality of a quantized checkpoint beside its original",
                        description="Perplexity (causal LMs) or embedding cosine (encoders) of a compressed-tensors "
                        "checkpoint (calib's or another tool's) beside the original model, on held-out text "
                        "(default: WikiText-2 test, packaged). Backend calib computes as vLLM serves the checkpoint: "
                        "stored weights, fused shards re-quantized as vLLM does, activations and the KV cache "
                        "quantized.")
    ev.add_argument("--model", default=None,
                    help="the original model the checkpoint was made from (default: the embedded SmolLM2)")
    ev.add_argument("--quantized", required=True, help="the quantized checkpoint folder")
    ev.add_argument("--dataset", default=None, help="held-out text: .txt file (as is), .jsonl/.json/.parquet or hub "
                    "dataset (rows joined with blank lines); default WikiText-2 test")
    ev.add_argument("--text-column", default="text", help="text column of the dataset (default text)")
    ev.add_argument("--split", default="test", help="split of a hub dataset (default test)")
    ev.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per window (default 512)")
    ev.add_argument("--max-tokens", type=_positive_int, default=16384,
                    help="evaluate on at most this many tokens (default 16384)")
    ev.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward (default 4)")
    ev.add_argument("--backend", action="append", choices=["calib", "weights", "transformers", "vllm"],
                    default=None,
                    help="how the quantized checkpoint is computed: calib (as vLLM serves it; default), weights "
                    "(weights dequantized, float activations), transformers (transformers + compressed-tensors), "
                    "vllm (real vLLM, causal LMs; ratio to the original also run in vLLM); repeat for several")
    ev.add_argument("--vllm-python", default=None,
                    help="python of a venv with vLLM, for --backend vllm (default: $CALIB_VLLM_PYTHON, else this "
                    "interpreter if it has vLLM)")
    ev.add_argument("--vllm-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "auto"],
                    help="dtype vLLM runs both models in (default bfloat16: vLLM's CPU build runs INT8 W8A8 in "
                    "bfloat16 only)")
    ev.add_argument("--json", default=None, help="also write the result as JSON to this path")
    ev.add_argument("--trust-remote-code", action="store_true", help="run the model's own Python code")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")

    ins = sub.add_parser("inspect", parents=[debug], help="what a quantized checkpoint holds, layer by layer",
                         description="Scheme, ignored modules, per-layer weight and input scales, KV-cache scales, "
                         "provenance, memory before/after of any compressed-tensors checkpoint; with --original, "
                         "each layer's weight SQNR and the worst layers.")
    ins.add_argument("checkpoint", help="the quantized checkpoint folder")
    ins.add_argument("--original", default=None, help="the model it was made from (folder, .gguf or hub id)")
    ins.add_argument("--plot", default=None, help="write a PNG of per-layer input ranges, scales and SQNR")
    ins.add_argument("--json", action="store_true", help="print JSON instead of the table")

    sub.add_parser("recipes", parents=[debug], help="list the bundled recipes")
    return parser


def _run_inspect(args) -> None:
    import json

    from calib.inspection import format_inspection, inspect_checkpoint, plot

    result = inspect_checkpoint(args.checkpoint, args.original)
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result, indent=2) if args.json else format_inspection(result))


def _run_eval(args) -> None:
    import json
    from pathlib import Path

    from calib.quality import evaluate, format_table

    result = evaluate(args.model, args.quantized, args.dataset, text_column=args.text_column, split=args.split,
                      seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=args.batch_size,
                      backends=tuple(dict.fromkeys(args.backend or ["calib"])), progress=not args.no_progress,
                      trust_remote_code=args.trust_remote_code, vllm_python=args.vllm_python,
                      vllm_dtype=args.vllm_dtype)
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(path)


def _print_summary(report: dict) -> None:
    t = report["timings_s"]
    execution = report["execution"]
    before, after = report["size_before_bytes"], report["size_after_bytes"]
    data = "none needed" if not report["dataset"] else (
        f"{report['dataset']}: {report['num_samples']} samples x {report['seq_len']} tokens, "
        f"{report['calibration_tokens']} tokens")
    lines = [
        f"calib {report['calib_version']}: {report['model']} -> {report['output']}",
        f"  recipe      {report['recipe']} (format {report['format']})",
        f"  data        {data}",
        f"  layers      {report['layers_quantized']} quantized" + _coverage_text(report.get("coverage")),
        f"  size        {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({after / max(before, 1):.2f}x)",
        f"  time        load {t['load']:.1f}s, data {t['data']:.1f}s, calibrate {t['calibrate']:.1f}s, "
        f"quantize {t['quantize']:.1f}s, export {t['export']:.1f}s, total {t['total']:.1f}s",
        f"  peak memory {report['peak_rss_mb']:.0f} MiB RSS",
        f"  mode        {execution['mode']}: {execution['reason']}" + (
            "; hidden states spilled to disk" if execution.get("hidden_states_spilled_to_disk") else ""),
    ]
    dist = report.get("distributed")
    if dist:
        split = " | ".join(f"{r['batches'][0]}-{r['batches'][1]}" for r in dist.get("split", []))
        weights = dist.get("weights_quantized_by_rank") or {}
        shared = " | ".join(str(v) for v in weights.values())
        lines.append(f"  processes   {dist['processes']} ({dist['backend']}, {dist['nodes']} node(s))"
                     + (f"; batches per rank {split}" if split else "") + f"; weights quantized per rank {shared}")
    for note in report.get("notes", []):
        lines.append(f"  note        {note}")
    for entry in report.get("unmatched_recipe_entries", []):
        lines.append(f"  warning     recipe {entry} matches no module of this model")
    if report.get("unobserved_modules"):
        lines.append(f"  note        {len(report['unobserved_modules'])} modules saw no tokens (sibling range used)")
    errors = report.get("output_error")
    if errors:
        worst = ", ".join(f"{e['name']} {e['output_error']:.4f}" for e in errors["worst_layers"][:3])
        lines.append(f"  output err  mean {errors['mean']:.4f}; worst {worst}")
    smooth = report.get("smoothquant")
    if smooth:
        lines.append(f"  smoothquant {len(smooth['pairs'])} pairs, {smooth['what']}")
    gptq = report.get("gptq")
    if gptq:
        text = f"{gptq['layers_solved']} layers solved"
        if gptq["mean_output_error"] is not None:
            text += (f"; relative output error from the weights {gptq['mean_output_error']:.4f} (mean; "
                     f"round-to-nearest {gptq['mean_output_error_round_to_nearest']:.4f})")
        if gptq["rounded_to_nearest"]:
            text += f"; {len(gptq['rounded_to_nearest'])} rounded to nearest (see the report)"
        if gptq.get("two_pass_layers"):
            text += (f"; {len(gptq['two_pass_layers'])} decoder layer(s) in two passes, "
                     f"{gptq['in_order_layers']} in order (see the report)")
        lines.append(f"  gptq        {text}")
    from calib.moe import moe_summary

    moe = moe_summary(report.get("moe"))
    if moe:
        lines.append(f"  moe         {moe}")
    lines.append(f"  report      {report['output']}/calib_report.json")
    print("\n".join(lines))


def _coverage_text(coverage: dict | None) -> str:
    if not coverage:
        return ""
    text = f", coverage {coverage['ratio']:.0%} of targeted weights"
    kept = len(coverage["routers_in_high_precision"])
    if kept:
        text += f"; {kept} MoE routers kept in high precision"
    if coverage["unsupported_ignored"]:
        text += f"; {len(coverage['unsupported_ignored'])} unsupported modules left unquantized by the recipe's ignore"
    return text


def _print_dry_run(plan: dict) -> None:
    from calib.estimate import human

    def per_dtype(counts: dict, unit) -> str:
        return ", ".join(f"{dtype} {unit(n)}" for dtype, n in counts.items())

    memory = plan["memory"]
    cal = plan["calibration"]
    lines = [
        f"calib dry run (no weight read, nothing written): {plan['model']} ({plan['model_class']})",
        f"  recipe      {plan['recipe']} (format {plan['format']}), on {plan['device']}, loaded as {plan['load_dtype']}",
        f"  parameters  {sum(plan['parameters'].values()):,} ({per_dtype(plan['parameters'], lambda n: f'{n:,}')})",
        f"  in memory   {per_dtype(plan['bytes_in_memory'], human)}",
    ]
    if plan["bytes_on_disk"]:
        lines.append(f"  on disk     {per_dtype(plan['bytes_on_disk'], human)}")
    lines += [
        f"  layers      {plan['layers_quantized']} quantized, {plan['layers_ignored']} left in high precision",
        "  data        " + ("none needed" if not cal else f"{cal['dataset']}: {cal['samples']} samples x "
                           f"{cal['seq_len']} tokens = {cal['tokens']:,} tokens, batch {cal['batch_size']}"),
        f"  checkpoint  about {human(plan['checkpoint_bytes_estimate'])}",
        f"  memory      estimated peak {human(memory['in_memory_peak_estimate_bytes'])} in memory; budget "
        f"{human(memory['budget_bytes'])} ({memory['budget_from']})",
        f"  mode        {plan['mode']}: {plan['mode_reason']}",
    ]
    if memory.get("sequential_peak_estimate_bytes"):
        lines.append(f"  sequential  estimated peak {human(memory['sequential_peak_estimate_bytes'])}"
                     + (", hidden states spilled to disk" if memory["hidden_states_spilled_to_disk"] else "")
                     + ("" if plan["mode"] == "sequential" else " (if run with --sequential)"))
    lines += [f"  warning     {w}" for w in plan["warnings"]]
    print("\n".join(lines))


def _list_recipes() -> None:
    from calib.recipe import bundled_recipes, load_recipe

    width = 20
    for name, path in sorted(bundled_recipes().items()):
        recipe = load_recipe(path)
        data = "needs calibration data" if recipe.needs_calibration else "data-free"
        print(f"{name:{width}s} {recipe.format}, {data}")
        description = " ".join(recipe.description.split())
        print(textwrap.fill(description, width=100, initial_indent=" " * (width + 1),
                            subsequent_indent=" " * (width + 1), break_on_hyphens=False))


def _quiet_libraries(progress: bool, debug: bool) -> None:
    if not debug:
        for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if not progress:
        # Other libraries' bars (datasets' map/load, transformers' weight loading, hub downloads).
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _one_paragraph(exc: BaseException) -> str:
    text = str(exc)
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + f"... ({len(text) - MAX_ERROR_CHARS} more characters)"
    return text


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    debug = getattr(args, "debug", False)
    rank = _launcher_rank()
    logging.basicConfig(level=logging.DEBUG if debug else (logging.INFO if not rank else logging.WARNING),
                        format=("" if rank is None else f"[rank {rank}] ") + "%(levelname)s %(name)s: %(message)s")
    if rank and hasattr(args, "no_progress"):
        args.no_progress = True  # one set of progress bars: rank 0's
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        if args.command == "recipes":
            _list_recipes()
            return EXIT_OK
        if args.command == "inspect":
            _quiet_libraries(progress=True, debug=debug)
            _run_inspect(args)
            return EXIT_OK
        if args.command == "eval":
            _quiet_libraries(progress=not args.no_progress, debug=debug)
            _run_eval(args)
            return EXIT_OK
        from calib.recipe import load_recipe

        recipe = load_recipe(args.recipe)  # a bad recipe answers before torch is even imported
        if args.moe_calibrate_all_experts:
            recipe = recipe.model_copy(update={"calibration": recipe.calibration.model_copy(
                update={"moe_calibrate_all_experts": True})})
        _quiet_libraries(progress=not args.no_progress, debug=debug)
        if args.dry_run:
            from calib.pipeline import dry_run

            _print_dry_run(dry_run(
                model=args.model, recipe=recipe, dataset=args.dataset, text_column=args.text_column,
                split=args.split, num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                packing=args.packing, seed=args.seed, dtype=args.dtype, device=args.device,
                max_memory=args.max_memory, trust_remote_code=args.trust_remote_code, mode=args.mode))
            return EXIT_OK
        from calib.pipeline import run

        report = run(
            model=args.model, recipe=recipe, dataset=args.dataset, output=args.output,
            text_column=args.text_column, split=args.split, num_samples=args.num_samples,
            seq_len=args.seq_len, batch_size=args.batch_size, packing=args.packing, seed=args.seed,
            dtype=args.dtype, device=args.device, max_shard_size=args.max_shard_size,
            overwrite=args.overwrite, progress=not args.no_progress,
            trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
            max_memory=args.max_memory, mode=args.mode,
        )
        if "rank" in report:  # torchrun: ranks other than 0 leave the summary to rank 0
            logging.getLogger("calib").info("rank %d of %d done (rank 0 wrote %s)", report["rank"],
                                            report["processes"], report["output"])
        else:
            _print_summary(report)
        return EXIT_OK
    except CalibInputError as exc:
        if debug:
            raise
        where = "" if rank is None else f" (rank {rank})"
        print(f"calib: error{where}: {_one_paragraph(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `calib recipes | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Terminated:
        print("calib: terminated; nothing was written", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("calib: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        if debug:
            raise
        logging.getLogger("calib").exception("unexpected error; please report it with the traceback below")
        return EXIT_BUG
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if "torch.distributed" in sys.modules:
            from calib import distributed

            distributed.shutdown()


def _launcher_rank() -> int | None:
    """This process's rank when a launcher (torchrun) started several, else None."""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return int(os.environ.get("RANK", "0"))
    except ValueError:
        return None
    return None


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    raise SystemExit(main())
