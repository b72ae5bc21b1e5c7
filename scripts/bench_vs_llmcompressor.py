#!/usr/bin/env python3
"""calib vs llm-compressor, side by side: end-to-end wall time and quality.

For each model and scheme, both tools quantize the SAME model folder with the same
scheme, the same calibration text and the same samples x seq-len x batch size, and
each tool runs as its own subprocess (a fresh interpreter, as a user would run it):

* calib: ``<calib venv>/bin/python -m calib run --model DIR --recipe SCHEME --dataset
  calib.txt --num-samples N --seq-len L --batch-size B --output OUT ...``; its internal
  total is ``timings_s.total`` of ``OUT/calib_report.json`` (load + data + calibrate +
  quantize + export).
* llm-compressor: ``<llmc venv>/bin/python scripts/llmcompressor_reference.py ...``
  (``oneshot`` with a ``QuantizationModifier``, presets FP8 / W8A8); its internal total
  is the script's ``total_s`` (load + data + oneshot + save).

llm-compressor must be installed in its OWN virtual environment (it pins its own
torch / transformers / compressed-tensors); the module docstring of
``scripts/llmcompressor_reference.py`` says how to create it (default
``../llmc-venv``, see ``--llmc-python``). This script itself needs only the
standard library; it must be able to run calib's venv python (``--calib-python``),
which also does the data preparation and the evaluation.

Method
------
* Runs are interleaved to reduce drift: calib, llm-compressor, calib, llm-compressor
  ... (``--repeats`` each, default 2); the table shows the minimum and, in
  parentheses, the median. Output folders are deleted before each run (not timed).
* Timings on a small shared machine are fragile: before each run the script waits until
  other processes leave the CPUs idle (``--max-wait``), and it measures the CPU time the
  rest of the machine used during the run (/proc/stat minus the child's own rusage); a
  run that another job skewed is discarded and redone (``--retries``), or kept and
  flagged ``skewed`` in the JSON and the table.
* "whole process" = wall clock of the subprocess, from spawn to exit (interpreter
  start, imports, everything). The reference script ALSO does work calib's CLI does not:
  before its timed part it loads the FP32 model, measures its perplexity and runs a
  plain forward over the calibration set; after it, it measures the perplexity of the
  in-memory and of the reloaded model. "llmc like-for-like" removes those from its wall
  time: wall - (script_s - import_s - total_s), i.e. process start + imports + total_s.
* Quality: ONE evaluator for everything, run in calib's venv (transformers +
  compressed-tensors): ``AutoModelForCausalLM.from_pretrained(checkpoint)`` and
  ``calib.evaluate.perplexity`` (non-overlapping windows of the PPL length, tokenized
  without special tokens, partial tail dropped), on the held-out text, for the FP32
  model and for the checkpoint each tool wrote in its last repeat. llm-compressor's own
  PPLs (its script's evaluator, same windowing) are kept in the JSON as a cross-check.
* Data: the calibration text is the first 90 % (characters) of the model's text file,
  the held-out text the last 10 %. For SmolLM2 the held-out text is cut to just past the
  first ``16 x 512`` tokens, so both evaluators score exactly 16 windows of 512. Note the
  tools pick calibration windows differently from the same text: calib tokenizes the whole
  file and draws N seeded random windows; the reference script takes the first N windows.
* Models: ``tinystories`` (../shared/models/tinystories-llama-263k, 64 x 128 on
  TinyStories) and ``smollm2`` (calib's embedded default, SmolLM2-135M-Instruct, a GGUF
  file that llm-compressor cannot read: it is materialized once as an HF folder in
  ``--workdir`` with calib's loader, and both tools get that folder; 64 x 512 on
  WikiText-2 test).

Usage::

    .venv/bin/python scripts/bench_vs_llmcompressor.py --json /tmp/vs_llmc.json
    .venv/bin/python scripts/bench_vs_llmcompressor.py --quick      # tinystories, 1 repeat
    ... --models smollm2 --schemes fp8-static --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_SCRIPT = ROOT / "scripts" / "llmcompressor_reference.py"
SHARED = Path(os.environ.get("CALIB_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
SCHEMES = ("fp8-static", "int8-w8a8-dynamic")
CALIB_FRACTION = 0.9  # the first 90 % of the characters calibrate, the rest is held out

# name -> how to get the model, which text, default calibration and evaluation shapes.
# "model": an HF folder, or None for calib's embedded default (materialized from GGUF).
MODELS = {
    "tinystories": {
        "model": str(SHARED / "models" / "tinystories-llama-263k"),
        "text": str(SHARED / "data" / "tinystories" / "tinystories_val.txt"),
        "samples": 64, "seq_len": 128, "batch_size": 8,
        "ppl_seq_len": 128, "ppl_max_windows": None,
    },
    "smollm2": {
        "model": None,
        "text": str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"),
        "samples": 64, "seq_len": 512, "batch_size": 8,
        "ppl_seq_len": 512, "ppl_max_windows": 16,
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # each venv sees only its own packages
    return env


# --------------------------------------------------------------------------- helpers run in calib's venv
# (invoked as `<calib python> this_script --_helper ...`; they import torch/transformers/calib)


def helper_materialize(folder: str) -> None:
    """Save calib's embedded default model (GGUF) as a plain HF folder."""
    from calib.models import load_model

    loaded = load_model(None)
    model = loaded.model
    # transformers dequantizes GGUF on load (plain float tensors) but keeps a GGUF
    # "quantizer" on the model, and save_pretrained refuses a model "quantized with gguf"
    # (ValueError: ... not serializable). Forget it: the weights are ordinary floats.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
    tmp = Path(folder + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    tmp.rename(folder)


def helper_texts(spec_json: str) -> None:
    """Write calib.txt / heldout.txt; with ppl_max_windows, cut the held-out text just past
    that many full windows so every evaluator scores exactly those windows."""
    spec = json.loads(spec_json)
    text = Path(spec["text"]).read_text(encoding="utf-8")
    cut = int(len(text) * CALIB_FRACTION)
    calib_text, heldout = text[:cut], text[cut:]
    info = {"calib_chars": len(calib_text), "heldout_chars_full": len(heldout)}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    # llm-compressor's script tokenizes with the tokenizer's defaults, calib.evaluate without
    # special tokens: note whether they differ for this tokenizer.
    probe = heldout[:2000]
    info["default_tokenization_adds_special_tokens"] = (
        tok(probe)["input_ids"] != tok(probe, add_special_tokens=False)["input_ids"])
    if spec["ppl_max_windows"]:
        enc = tok(heldout, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        need = spec["ppl_max_windows"] * spec["ppl_seq_len"]
        stop = need + spec["ppl_seq_len"] // 2  # mid-way into the (dropped) next window
        if len(ids) > stop:
            heldout = heldout[: offsets[stop][0]]
            again = tok(heldout, add_special_tokens=False, verbose=False)["input_ids"]
            info["heldout_cut_same_tokens"] = again[:need] == ids[:need]
    info["heldout_chars"] = len(heldout)
    info["heldout_tokens"] = len(tok(heldout, add_special_tokens=False, verbose=False)["input_ids"])
    out = Path(spec["dir"])
    (out / "calib.txt").write_text(calib_text, encoding="utf-8")
    (out / "heldout.txt").write_text(heldout, encoding="utf-8")
    print(json.dumps(info))


def checkpoint_summary(folder: str) -> dict:
    """What a checkpoint holds: quantized layers, scale tensors, dtypes, size."""
    from safetensors import safe_open

    config = json.loads((Path(folder) / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a dict)
                tensors[key] = f.get_tensor(key)
    weight_scales = sorted(k for k in tensors if k.endswith(".weight_scale"))
    return {
        "format": qcfg.get("format"),
        "ignore": qcfg.get("ignore"),
        "quantization_status": qcfg.get("quantization_status"),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        "quantized_layers": len(weight_scales),
        "input_scales": sum(k.endswith(".input_scale") for k in tensors),
        "zero_points": sum(k.endswith("zero_point") for k in tensors),
        "has_lm_head_weight": "lm_head.weight" in tensors,
        "weight_dtypes": sorted({str(tensors[k[: -len("_scale")]].dtype) for k in weight_scales
                                 if k[: -len("_scale")] in tensors}),
        "scale_dtypes": sorted({str(tensors[k].dtype) for k in weight_scales}),
        "bytes": sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")),
        "_tensors": tensors,
    }


def compare_checkpoints(a: dict, b: dict) -> dict:
    """Scale and weight agreement between two checkpoint summaries (a = calib, b = llmc)."""
    import torch

    ta, tb = a.pop("_tensors"), b.pop("_tensors")
    out: dict = {}
    for suffix in (".weight_scale", ".input_scale"):
        names_a = {k for k in ta if k.endswith(suffix)}
        names_b = {k for k in tb if k.endswith(suffix)}
        common = sorted(names_a & names_b)
        rel = {k: ((ta[k].double() - tb[k].double()).abs() / tb[k].double().abs().clamp_min(1e-30)).max().item()
               for k in common if ta[k].shape == tb[k].shape}
        key = suffix.strip(".")
        out[key] = {
            "only_calib": sorted(names_a - names_b), "only_llmc": sorted(names_b - names_a),
            "shape_mismatch": [k for k in common if ta[k].shape != tb[k].shape],
            "max_rel_diff": max(rel.values()) if rel else None,
            "layers_rel_diff_over_1e-3": sorted(k for k, v in rel.items() if v > 1e-3),
            "worst": max(rel, key=rel.get) if rel else None,
        }
    # quantized weight codes: fraction of elements that differ, where shapes and dtypes agree
    differ = total = 0
    for k in (k for k in ta if k.endswith(".weight_scale")):
        w = k[: -len("_scale")]
        if w in ta and w in tb and ta[w].shape == tb[w].shape and ta[w].dtype == tb[w].dtype:
            differ += (ta[w].view(torch.uint8) != tb[w].view(torch.uint8)).sum().item()
            total += ta[w].numel()
    out["weight_codes_differ_fraction"] = differ / total if total else None
    return out


def helper_evaluate(spec_json: str) -> None:
    """Held-out PPL of the FP32 model and of each checkpoint with calib.evaluate.perplexity,
    plus a structural comparison of the two checkpoints."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calib.evaluate import perplexity

    spec = json.loads(spec_json)
    heldout = Path(spec["heldout"]).read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    result: dict = {}
    todo = [("fp32", spec["model_dir"], torch.float32)] if spec["fp32"] else []
    todo += [(name, path, None) for name, path in spec["checkpoints"].items()]
    for name, path, dtype in todo:
        start = time.perf_counter()
        try:
            kwargs = {"dtype": dtype} if dtype else {}  # checkpoints: as llm-compressor's script loads them
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
            with torch.inference_mode():
                ppl = perplexity(model, tokenizer, heldout, seq_len=spec["seq_len"],
                                 max_windows=spec["max_windows"])
            result[name] = {"ppl": ppl, "dtype": str(next(model.parameters()).dtype),
                            "eval_s": round(time.perf_counter() - start, 2)}
            del model
        except Exception as exc:  # noqa: BLE001  (report it, keep going)
            result[name] = {"ppl": None, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        log(f"  evaluated {name}: {result[name]}")
    try:
        summaries = {name: checkpoint_summary(path) for name, path in spec["checkpoints"].items()}
        if {"calib", "llmc"} <= summaries.keys():
            result["comparison"] = compare_checkpoints(summaries["calib"], summaries["llmc"])
        for summary in summaries.values():
            summary.pop("_tensors", None)
        result["checkpoints"] = summaries
    except Exception as exc:  # noqa: BLE001  (the comparison is extra information)
        result["comparison_error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result))


# --------------------------------------------------------------------------- orchestration (stdlib only)


def run_helper(python: str, *args: str) -> dict | None:
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--_helper", *args],
                          capture_output=True, text=True, env=child_env(), cwd=str(ROOT), check=False)
    if proc.returncode != 0:
        log(f"helper {args[0]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return None
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def busy_cpu_s() -> float | None:
    """CPU seconds the whole machine has been busy since boot (Linux /proc/stat), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(max_wait_s: float, probe_s: float = 2.0, busy_cores: float = 0.25) -> None:
    """Block while other processes keep more than ``busy_cores`` cores busy (2 cores
    shared with other jobs make timings meaningless), at most ``max_wait_s``."""
    deadline = time.monotonic() + max_wait_s
    said = False
    while True:
        b0 = busy_cpu_s()
        time.sleep(probe_s)
        b1 = busy_cpu_s()
        if b0 is None or b1 is None or (b1 - b0) / probe_s <= busy_cores:
            return
        if time.monotonic() > deadline:
            log("  warning: the machine is still busy; running anyway")
            return
        if not said:
            log(f"  machine busy ({(b1 - b0) / probe_s:.2f} cores used by other processes): waiting ...")
            said = True
        time.sleep(15)


def timed_subprocess(cmd: list[str], log_path: Path) -> dict:
    """Run cmd, stdout+stderr to log_path; wall clock, exit code and the child's own
    peak RSS and CPU time (os.wait4: this child only). ``other_cpu_s``: CPU time the
    rest of the machine used meanwhile; large values mean another job skewed the timing."""
    with open(log_path, "w") as logf:
        busy0, start = busy_cpu_s(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=child_env(), cwd=str(ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
        wall, busy1 = time.perf_counter() - start, busy_cpu_s()
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    other = None if busy0 is None or busy1 is None else round(max(busy1 - busy0 - cpu, 0.0), 2)
    return {"rc": proc.returncode, "wall_s": round(wall, 3), "cpu_s": round(cpu, 2), "other_cpu_s": other,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "log": str(log_path)}


def skewed(run: dict) -> bool:
    """Did other processes use more than ~20 % of a core-second per wall second?"""
    return run["other_cpu_s"] is not None and run["other_cpu_s"] > 0.2 * run["wall_s"] + 1


def measured(args, cmd: list[str], log_path: Path, before=lambda: None) -> dict:
    """timed_subprocess on an idle machine; a run that another job skewed is redone
    (``--retries`` times; ``skewed_attempts`` counts the discarded ones)."""
    for attempt in range(args.retries + 1):
        before()
        wait_until_idle(args.max_wait)
        run = timed_subprocess(cmd, log_path)
        if not skewed(run):
            break
        log(f"  other processes used {run['other_cpu_s']:.1f} CPU s during this {run['wall_s']:.1f} s run"
            + (": discarded, redoing it" if attempt < args.retries else ": kept, marked skewed"))
    run["skewed_attempts"] = attempt + (1 if skewed(run) else 0)
    run["skewed"] = skewed(run)
    return run


def log_tail(path: str, n: int = 25) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])


def run_calib(args, model_dir: str, scheme: str, shape: dict, texts: Path, out: Path, tag: str) -> dict:
    cmd = [args.calib_python, "-m", "calib", "run", "--model", model_dir, "--recipe", scheme,
           "--dataset", str(texts / "calib.txt"), "--num-samples", str(shape["samples"]),
           "--seq-len", str(shape["seq_len"]), "--batch-size", str(shape["batch_size"]),
           "--output", str(out), "--overwrite", "--no-progress"]
    run = measured(args, cmd, out.parent / f"{tag}.log", before=lambda: shutil.rmtree(out, ignore_errors=True))
    report_path = out / "calib_report.json"
    if run["rc"] == 0 and report_path.is_file():
        report = json.loads(report_path.read_text())
        run.update(internal_total_s=report["timings_s"]["total"], timings_s=report["timings_s"],
                   internal_peak_rss_mb=report.get("peak_rss_mb"),
                   layers_quantized=report.get("layers_quantized"),
                   calibration_tokens=report.get("calibration_tokens"))
    else:
        run["error"] = log_tail(run["log"])
    return run


def run_llmc(args, model_dir: str, scheme: str, shape: dict, texts: Path, out: Path, tag: str) -> dict:
    result_json = out.parent / f"{tag}.json"

    def clean():
        shutil.rmtree(out, ignore_errors=True)
        result_json.unlink(missing_ok=True)

    cmd = [args.llmc_python, str(REFERENCE_SCRIPT), "--model", model_dir, "--scheme", scheme,
           "--calib-text", str(texts / "calib.txt"), "--heldout-text", str(texts / "heldout.txt"),
           "--samples", str(shape["samples"]), "--seq-len", str(shape["seq_len"]),
           "--batch-size", str(shape["batch_size"]), "--output", str(out), "--json", str(result_json)]
    run = measured(args, cmd, out.parent / f"{tag}.log", before=clean)
    if run["rc"] == 0 and result_json.is_file():
        ref = json.loads(result_json.read_text())
        extras = ref["script_s"] - ref["import_s"] - ref["total_s"]  # FP32 PPL + forward + evals
        run.update(internal_total_s=ref["total_s"], oneshot_s=ref["oneshot_s"],
                   timings_s={k: ref[k] for k in ("import_s", "load_s", "data_s", "oneshot_s", "save_s",
                                                  "total_s", "calib_forward_s", "eval_s", "script_s")},
                   like_for_like_s=round(run["wall_s"] - extras, 3),
                   own_ppl_fp32=ref.get("ppl_fp32"), own_ppl_quant=ref.get("ppl_quant"),
                   own_ppl_in_memory=ref.get("ppl_quant_in_memory"), own_ppl_tokens=ref.get("ppl_tokens"),
                   calib_samples=ref.get("calib_samples"), versions=ref.get("versions"))
    else:
        run["error"] = log_tail(run["log"])
    return run


def stats(runs: list[dict], key: str) -> dict | None:
    values = [r[key] for r in runs if r.get("rc") == 0 and r.get(key) is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "all": values}


def prepare_model(args, name: str) -> str | None:
    spec = MODELS[name]
    if spec["model"]:
        return spec["model"]
    folder = Path(args.workdir) / "models" / name
    if not (folder / "config.json").is_file():
        log(f"{name}: materializing calib's embedded default (GGUF) as an HF folder in {folder}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        if run_helper(args.calib_python, "materialize", str(folder)) is None:
            return None
    return str(folder)


def bench_model(args, name: str) -> list[dict]:
    spec = MODELS[name]
    shape = {k: getattr(args, k) or spec[k] for k in ("samples", "seq_len", "batch_size")}
    rows = []
    model_dir = prepare_model(args, name)
    if model_dir is None:
        return [{"model": name, "scheme": s, "error": "could not materialize the model"} for s in args.schemes]
    texts = Path(args.workdir) / "texts" / name
    texts.mkdir(parents=True, exist_ok=True)
    text_info = run_helper(args.calib_python, "texts", json.dumps({
        "text": spec["text"], "model_dir": model_dir, "dir": str(texts),
        "ppl_seq_len": spec["ppl_seq_len"], "ppl_max_windows": spec["ppl_max_windows"]}))
    if text_info is None:
        return [{"model": name, "scheme": s, "error": "could not write the texts"} for s in args.schemes]
    log(f"{name}: {model_dir}; texts {text_info}")
    fp32 = None
    for scheme in args.schemes:
        work = Path(args.workdir) / "runs" / name / scheme
        work.mkdir(parents=True, exist_ok=True)
        outs = {"calib": work / "calib-out", "llmc": work / "llmc-out"}
        runs: dict[str, list[dict]] = {"calib": [], "llmc": []}
        for rep in range(args.repeats):  # interleaved: calib, llmc, calib, llmc, ...
            for tool, fn in (("calib", run_calib), ("llmc", run_llmc)):
                log(f"{name} {scheme}: {tool} run {rep + 1}/{args.repeats} ...")
                r = fn(args, model_dir, scheme, shape, texts, outs[tool], f"{tool}-{rep + 1}")
                log(f"  {tool}: rc {r['rc']}, wall {r['wall_s']:.1f}s, internal {r.get('internal_total_s')}, "
                    f"cpu {r['cpu_s']}s, other processes {r['other_cpu_s']} cpu s")
                if r["rc"] != 0:
                    log(f"  {tool} FAILED, log tail:\n{r.get('error')}")
                runs[tool].append(r)
        # Quality of the last repeat's checkpoints (identical inputs each repeat), one evaluator.
        ok = {t: str(outs[t]) for t in outs if runs[t] and runs[t][-1]["rc"] == 0}
        log(f"{name} {scheme}: evaluating {sorted(ok)}{' + fp32' if fp32 is None else ''} ...")
        quality = run_helper(args.calib_python, "evaluate", json.dumps({
            "model_dir": model_dir, "heldout": str(texts / "heldout.txt"), "checkpoints": ok,
            "fp32": fp32 is None, "seq_len": spec["ppl_seq_len"], "max_windows": spec["ppl_max_windows"]})) or {}
        if fp32 is None:
            fp32 = quality.get("fp32", {})
        rows.append({
            "model": name, "model_dir": model_dir, "scheme": scheme, **shape,
            "ppl_seq_len": spec["ppl_seq_len"], "ppl_max_windows": spec["ppl_max_windows"], "texts": text_info,
            "calib_wall_s": stats(runs["calib"], "wall_s"), "llmc_wall_s": stats(runs["llmc"], "wall_s"),
            "calib_internal_s": stats(runs["calib"], "internal_total_s"),
            "llmc_internal_s": stats(runs["llmc"], "internal_total_s"),
            "llmc_like_for_like_s": stats(runs["llmc"], "like_for_like_s"),
            "llmc_oneshot_s": stats(runs["llmc"], "oneshot_s"),
            "ppl_fp32": fp32.get("ppl"), "ppl_calib": quality.get("calib", {}).get("ppl"),
            "ppl_llmc": quality.get("llmc", {}).get("ppl"),
            "quality": quality, "runs": runs,
        })
    return rows


# --------------------------------------------------------------------------- report


def fmt(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "failed"
    if len(s["all"]) == 1:
        return f"{s['min']:.{digits}f}"
    return f"{s['min']:.{digits}f} ({s['median']:.{digits}f})"


def ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b:
        return "–"
    if len(a["all"]) == 1 and len(b["all"]) == 1:
        return f"{a['min'] / b['min']:.2f}"
    return f"{a['min'] / b['min']:.2f} ({a['median'] / b['median']:.2f})"


def ppl(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "failed"


def tables(rows: list[dict]) -> str:
    out = [("| model | scheme | calib total (s, whole process) | llm-compressor total (s, whole process) "
            "| ratio calib/llmc | calib internal total | llmc internal total | PPL FP32 | PPL calib | PPL llmc |"),
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['scheme']} | {r['error']} |||||||")
            continue
        out.append(f"| {r['model']} | {r['scheme']} | {fmt(r['calib_wall_s'])} | {fmt(r['llmc_wall_s'])} | "
                   f"{ratio(r['calib_wall_s'], r['llmc_wall_s'])} | {fmt(r['calib_internal_s'], 2)} | "
                   f"{fmt(r['llmc_internal_s'], 2)} | {ppl(r['ppl_fp32'])} | {ppl(r['ppl_calib'])} | "
                   f"{ppl(r['ppl_llmc'])} |")
    flagged = [f"{r['model']} {r['scheme']} {t}" for r in rows if "runs" in r
               for t in ("calib", "llmc") if any(x.get("skewed") for x in r["runs"][t])]
    if flagged:
        out += ["", "WARNING: other processes used the CPUs during some kept runs: " + ", ".join(flagged)]
    out += ["", ("min (median) over repeats. whole process = subprocess wall clock. llm-compressor's whole "
                 "process also runs an FP32 PPL + plain calibration forward before, and two PPL evaluations "
                 "after; like-for-like drops those from its time (not from its peak RSS, which they dominate):"),
            "",
            ("| model | scheme | calib whole (s) | llmc like-for-like (s) | ratio | llmc oneshot (s) "
             "| calib peak RSS (MB) | llmc peak RSS (MB) | llmc own PPL FP32 / quant |"),
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            continue
        rss = {t: max((x["peak_rss_mb"] for x in r["runs"][t] if x["rc"] == 0), default=None)
               for t in ("calib", "llmc")}
        last = next((x for x in reversed(r["runs"]["llmc"]) if x["rc"] == 0), {})
        out.append(f"| {r['model']} | {r['scheme']} | {fmt(r['calib_wall_s'])} | {fmt(r['llmc_like_for_like_s'])} | "
                   f"{ratio(r['calib_wall_s'], r['llmc_like_for_like_s'])} | {fmt(r['llmc_oneshot_s'], 2)} | "
                   f"{rss['calib']} | {rss['llmc']} | "
                   f"{ppl(last.get('own_ppl_fp32'))} / {ppl(last.get('own_ppl_quant'))} |")
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="See the module docstring for the method.")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None,
                   help="models to run (default: tinystories smollm2)")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    p.add_argument("--repeats", type=int, default=None, help="runs per tool (default 2; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="tinystories only, 1 repeat")
    p.add_argument("--samples", type=int, help="override the model's calibration samples")
    p.add_argument("--seq-len", type=int, help="override the model's calibration tokens per sample")
    p.add_argument("--batch-size", type=int, help="override the batch size (default 8)")
    p.add_argument("--workdir", default="/tmp/bench_vs_llmc",
                   help="texts, materialized models, checkpoints and logs (default /tmp/bench_vs_llmc)")
    p.add_argument("--calib-python", default=str(ROOT / ".venv" / "bin" / "python"),
                   help="python of calib's venv (default <repo>/.venv/bin/python)")
    p.add_argument("--llmc-python", default=os.environ.get("LLMC_PYTHON", "../llmc-venv/bin/python"),
                   help="python of llm-compressor's venv (default $LLMC_PYTHON or ../llmc-venv/bin/python)")
    p.add_argument("--retries", type=int, default=2,
                   help="redo a run during which other processes used much CPU, up to this many times (default 2)")
    p.add_argument("--max-wait", type=float, default=1800,
                   help="seconds to wait, before each run, for other processes to leave the CPUs (default 1800)")
    p.add_argument("--json", help="also write every number (per run) to this file")
    p.add_argument("--_helper", nargs=2, metavar=("WHAT", "ARG"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.models is None:
        args.models = ["tinystories"] if args.quick else ["tinystories", "smollm2"]
    if args.repeats is None:
        args.repeats = 1 if args.quick else 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._helper:
        what, arg = args._helper
        {"materialize": helper_materialize, "texts": helper_texts, "evaluate": helper_evaluate}[what](arg)
        return 0
    for python in (args.calib_python, args.llmc_python):
        if not Path(python).is_file():
            sys.exit(f"error: {python} not found (see --calib-python / --llmc-python and the docstring)")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = []
    for name in args.models:
        rows.extend(bench_model(args, name))
    text = tables(rows)
    print(text)
    log(f"done in {time.perf_counter() - started:.0f}s; logs and checkpoints in {args.workdir}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "_helper"},
                                               "nproc": os.cpu_count(), "results": rows,
                                               "table": text}, indent=2) + "\n")
    failed = any("error" in r or not r.get("calib_wall_s") or not r.get("llmc_wall_s") for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
