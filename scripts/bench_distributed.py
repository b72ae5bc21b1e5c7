#!/usr/bin/env python
"""Data-parallel calibration: N processes (torchrun) vs 1 on the same model, recipe and data.

    python scripts/bench_distributed.py                      # ~400M random Llama, 64 x 512, 2 CPU processes
    python scripts/bench_distributed.py --quick              # 16 x 256
    python scripts/bench_distributed.py --model DIR --recipe fp8-static --recipe int8-w8a8-gptq --nproc 2
    python scripts/bench_distributed.py --device cuda        # on a GPU machine: 1 vs N GPUs (N = all), and
                                                             # 1 GPU vs the CPU when there is one GPU

For each recipe, in one run (machines are noisy, so ratios are side by side):
``calib run`` in one process, then ``torchrun --nproc-per-node N -m calib run``
with the same arguments, both sequential (layer by layer). Columns: wall time of
each command (process start to exit, model load and export included), the
calibration time from each report, the speed-up (single wall / N-process
wall), and whether the two checkpoints are the same bytes (every file but the
report). On a CPU machine every process gets the same threads
(``--threads-per-process``, default: cores / N, set as OMP_NUM_THREADS for the
single process too), so the speed-up is the data-parallel scaling and the bytes
can be compared (BLAS may round a product differently with another number of
threads); ``--all-cores`` adds a single process with every core, the way
``calib run`` runs by default.

The table goes to stdout (markdown) and, with --json, to a file.
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
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


def _run(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def _same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name != "calib_report.json")
    if names != sorted(p.name for p in b.iterdir() if p.name != "calib_report.json"):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def _report(folder: Path) -> dict:
    return json.loads((folder / "calib_report.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a safetensors model folder (default: a ~400M random Llama, made once)")
    parser.add_argument("--recipe", action="append", help="repeatable (default: fp8-static and int8-w8a8-gptq)")
    parser.add_argument("--dataset", default=str(WIKITEXT))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=None, help="processes (default: 2 on CPU, every GPU on cuda)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads-per-process", type=int, default=None,
                        help="CPU threads of every process (default: cores / N)")
    parser.add_argument("--all-cores", action="store_true", help="add a single process with every core")
    parser.add_argument("--quick", action="store_true", help="16 x 256")
    parser.add_argument("--work", type=Path, default=None, help="where models and checkpoints go (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.samples, args.seq_len = 16, 256
    recipes = args.recipe or ["fp8-static", "int8-w8a8-gptq"]
    work = args.work or Path(tempfile.mkdtemp(prefix="calib-bench-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}

    model = Path(args.model) if args.model else work / "random-llama-400m"
    if not (model / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "scripts"))
        import torch

        from make_random_model import write_random_model

        made = write_random_model(model, "llama-400m", torch.float32)
        print(f"made {model}: {made['params'] / 1e6:.0f}M parameters in {made['seconds']} s", file=sys.stderr)

    dataset = Path(args.dataset)
    if dataset.suffix == ".raw":  # WikiText's raw file: plain text under a name calib does not read
        copy = work / (dataset.stem + ".txt")
        copy.write_bytes(dataset.read_bytes())
        args.dataset = str(copy)
    gpus = 0
    if args.device.startswith("cuda"):
        import torch

        gpus = torch.cuda.device_count()
        if not gpus:
            print("--device cuda: no CUDA device here", file=sys.stderr)
            return 2
    nproc = args.nproc or (gpus if gpus > 1 else 2)
    common = ["--model", str(model), "--dataset", args.dataset, "--num-samples", str(args.samples), "--seq-len",
              str(args.seq_len), "--batch-size", str(args.batch_size), "--sequential", "--no-progress", "--overwrite"]
    # (label, device, processes): 1 vs N on the device; on one GPU, that GPU vs the CPU instead.
    threads = args.threads_per_process or max(1, (os.cpu_count() or 1) // nproc)
    # (label, device, processes, threads): 1 vs N on the device; on one GPU, that GPU vs the CPU instead.
    setups = [("1 process", args.device, 1, threads), (f"{nproc} processes", args.device, nproc, threads)]
    if args.device == "cpu" and args.all_cores:
        setups.append(("1 process, all cores", "cpu", 1, None))
    if gpus == 1:
        setups = [("CPU, 1 process", "cpu", 1, None), ("1 GPU", "cuda", 1, None)]
    rows = []
    for recipe in recipes:
        outputs = []
        for label, device, procs, cpu_threads in setups:
            out = work / (f"{recipe}-{device}-{procs}" + ("" if cpu_threads or device != "cpu" else "-all"))
            cmd = ["-m", "calib", "run", *common, "--recipe", recipe, "--device", device, "--output", str(out)]
            run_env = dict(env)
            if device == "cpu" and cpu_threads:
                run_env["OMP_NUM_THREADS"] = str(cpu_threads)
            if procs == 1:
                cmd = [sys.executable, *cmd]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                       *cmd]
            wall, done = _run(cmd, run_env)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"{label} failed on {recipe} (exit {done.returncode})")
            report = _report(out)
            outputs.append(out)
            rows.append({"recipe": recipe, "setup": label, "device": device, "processes": procs,
                         "threads_per_process": cpu_threads if device == "cpu" else None,
                         "wall_s": round(wall, 2), "calibrate_s": report["timings_s"]["calibrate"],
                         "quantize_write_s": report["timings_s"]["quantize"],
                         "peak_rss_mb_rank0": report["peak_rss_mb"], "peak_cuda_mb": report.get("peak_cuda_mb")})
            print(f"{recipe} {label}: {wall:.1f} s", file=sys.stderr)
        base, many = rows[-len(setups)], rows[-len(setups) + 1]
        many["speedup"] = round(base["wall_s"] / many["wall_s"], 3)
        many["calibrate_speedup"] = round(base["calibrate_s"] / max(many["calibrate_s"], 1e-9), 3)
        many["same_bytes"] = _same_bytes(outputs[0], outputs[1])
    import platform

    header = (f"model {model.name}, {args.samples} x {args.seq_len} tokens of {Path(args.dataset).name}, batch "
              f"{args.batch_size}, sequential; {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
    lines = [header, "", "| recipe | setup | threads per process | wall s | calibrate s | quantize+write s | "
             "speed-up (wall) | speed-up (calibrate) | same bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        threads = r["threads_per_process"] or ("all" if r["device"] == "cpu" else "")
        lines.append(f"| {r['recipe']} | {r['setup']} | {threads} | {r['wall_s']} | {r['calibrate_s']} "
                     f"| {r['quantize_write_s']} "
                     f"| {r.get('speedup', '')} | {r.get('calibrate_speedup', '')} | {r.get('same_bytes', '')} |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
