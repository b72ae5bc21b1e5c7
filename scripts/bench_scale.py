#!/usr/bin/env python3
"""Models larger than memory: calib's sequential and data-free modes, measured.

Every calib run is its own subprocess (``python -m calib run ...``, as a user
runs it); its peak RSS is the child's own ``ru_maxrss`` (``os.wait4``), the whole
process, runtime included; wall time is spawn to exit.

Parts (``--parts``, default all):

* ``7b``: a Llama-2-7B-shaped random-init model in bf16 (6.74B parameters,
  13.5 GB), written by ``scripts/make_random_model.py`` shard by shard.
  - ``fp8-static`` on 32 x 512 WikiText tokens with ``--max-memory 4GB``
    (auto mode picks sequential): peak RSS, checkpoint size, time per layer.
  - data-free ``fp8-dynamic``: its wall time divided by the time of copying the
    model folder (``cp -r``) on the same disk, the copy and the run interleaved
    (copy, calib, copy, calib ...); with ``--cold`` the page cache is emptied
    before each, so both read the model from the disk. Wall times run to the end
    of a ``sync``: what was written is on the disk.
* ``1b``: a ~1.1B Llama (TinyLlama's shapes) in bf16, ``fp8-static`` on the same
  data, ``--in-memory`` and ``--sequential`` interleaved: the ratios of their peak
  RSS and wall times, and that they wrote identical tensors; and llm-compressor's
  ``oneshot`` (preset FP8, bf16, the same sample count and length, its timed part
  only: ``scripts/llmcompressor_reference.py --timing-only``) in its own venv
  (``--llmc-python``), interleaved with them, where it is installed.

Usage::

    .venv/bin/python scripts/bench_scale.py --workdir /big/disk --json scale.json
    .venv/bin/python scripts/bench_scale.py --parts 1b --repeats 1

The models are kept in ``--workdir`` (reused when already there); outputs are
deleted after each run. Needs about 13.5 + 13.5 + 7 GB free for the 7B part.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CALIB_SHARED", ROOT.parent / "shared"))
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
GiB = 2**30


DROP_CACHES = Path("/proc/sys/vm/drop_caches")
COLD = {"on": False}  # --cold: every timed copy and calib run starts with an empty page cache


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def timed(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``cmd`` (after emptying the page cache with --cold); wall seconds, to
    the end of ``sync``, and the child's own peak RSS (bytes)."""
    if COLD["on"]:
        drop_caches()
    start = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        if log:
            out.close()
    os.sync()  # what was written is on the disk: copy and calib alike
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}\n{tail}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024}


def ensure_model(workdir: Path, preset: str) -> Path:
    folder = workdir / preset
    if (folder / "model.safetensors.index.json").is_file() and (folder / "config.json").is_file():
        return folder
    print(f"writing the random-init {preset} model to {folder} ...", flush=True)
    info = timed([sys.executable, str(ROOT / "scripts" / "make_random_model.py"), str(folder), "--preset", preset,
                  "--dtype", "bfloat16"])
    print(f"  done in {info['wall_s']:.0f} s", flush=True)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def calib_text(workdir: Path) -> Path:
    """WikiText-2 test as a .txt file (calib reads .txt, not .raw)."""
    path = workdir / "wikitext-2-test.txt"
    if not path.is_file():
        shutil.copyfile(WIKITEXT, path)
    return path


def calib_cmd(model: Path, out: Path, recipe: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "calib", "run", "--model", str(model), "--recipe", recipe, "--output", str(out),
           "--no-progress", "--overwrite"]
    if recipe != "fp8-dynamic":
        cmd += ["--dataset", str(calib_text(out.parent)), "--num-samples", "32", "--seq-len", "512",
                "--batch-size", "8"]
    return cmd + list(extra)


def calib_run(model: Path, out: Path, recipe: str, *extra: str, keep: bool = False) -> dict:
    if out.exists():
        shutil.rmtree(out)
    log = out.parent / f"{out.name}.log"
    result = timed(calib_cmd(model, out, recipe, *extra), env=dict(os.environ, HF_HUB_OFFLINE="1"), log=log)
    report = json.loads((out / "calib_report.json").read_text())
    result.update(checkpoint_bytes=folder_bytes(out), execution=report["execution"],
                  timings_s=report["timings_s"], sequential=report.get("sequential"),
                  layers_quantized=report["layers_quantized"])
    if not keep:
        shutil.rmtree(out)
    return result


def copy_run(model: Path, dest: Path) -> dict:
    if dest.exists():
        shutil.rmtree(dest)
    result = timed(["cp", "-r", str(model), str(dest)])
    shutil.rmtree(dest)
    return result


def raw_bytes(tensor) -> bytes:
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of two checkpoints, byte for byte (read one at a time)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        names = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                names.update({k: path for k in f.keys()})
        return names

    ia, ib = index(a), index(b)
    if sorted(ia) != sorted(ib):
        return False
    for name in ia:
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            ta, tb = fa.get_tensor(name), fb.get_tensor(name)
            if ta.dtype != tb.dtype or ta.shape != tb.shape:
                return False
            if raw_bytes(ta) != raw_bytes(tb):
                return False
    return True


def part_7b(workdir: Path, repeats: int) -> dict:
    model = ensure_model(workdir, "llama2-7b")
    out = {"model_bytes": folder_bytes(model)}
    print("7B fp8-static, --max-memory 4GB ...", flush=True)
    static = calib_run(model, workdir / "out-7b-static", "fp8-static", "--max-memory", "4GB")
    layers = (static["sequential"] or {}).get("layers") or 0
    static["seconds_per_layer"] = round(static["timings_s"]["calibrate"] / max(layers, 1), 2)
    out["fp8_static"] = static
    print(f"  {static['execution']['mode']}, {static['wall_s']:.0f} s, peak RSS "
          f"{static['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    copies, frees = [], []
    for _ in range(repeats):
        copies.append(copy_run(model, workdir / "copy-7b"))
        frees.append(calib_run(model, workdir / "out-7b-dynamic", "fp8-dynamic"))
        print(f"  copy {copies[-1]['wall_s']:.0f} s, data-free fp8-dynamic {frees[-1]['wall_s']:.0f} s, peak RSS "
              f"{frees[-1]['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    out["copy"] = copies
    out["fp8_dynamic"] = frees
    out["data_free_over_copy"] = round(min(f["wall_s"] for f in frees) / min(c["wall_s"] for c in copies), 3)
    return out


def llmc_run(python: Path, model: Path, out: Path) -> dict:
    """llm-compressor's ``oneshot`` (preset FP8) on the same model, data sizes and dtype, timed part only."""
    if out.exists():
        shutil.rmtree(out)
    text = calib_text(out.parent)
    cmd = [str(python), str(ROOT / "scripts" / "llmcompressor_reference.py"), "--model", str(model), "--scheme",
           "fp8-static", "--calib-text", str(text), "--heldout-text", str(text), "--samples", "32", "--seq-len",
           "512", "--batch-size", "8", "--dtype", "bfloat16", "--timing-only", "--output", str(out),
           "--json", str(out.parent / f"{out.name}.json")]
    result = timed(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"), log=out.parent / f"{out.name}.log")
    result.update(checkpoint_bytes=folder_bytes(out),
                  reference=json.loads((out.parent / f"{out.name}.json").read_text()))
    shutil.rmtree(out)
    return result


def part_1b(workdir: Path, repeats: int, llmc_python: Path | None) -> dict:
    model = ensure_model(workdir, "llama-1b")
    runs = {"in-memory": [], "sequential": []}
    if llmc_python is not None:
        runs["llm-compressor"] = []
    for i in range(repeats):
        last = i == repeats - 1
        for mode in runs:
            if mode == "llm-compressor":
                runs[mode].append(llmc_run(llmc_python, model, workdir / "out-1b-llmc"))
            else:
                runs[mode].append(calib_run(model, workdir / f"out-1b-{mode}", "fp8-static", f"--{mode}",
                                            keep=last))
            print(f"  1B {mode}: {runs[mode][-1]['wall_s']:.0f} s, peak RSS "
                  f"{runs[mode][-1]['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    identical = same_tensors(workdir / "out-1b-in-memory", workdir / "out-1b-sequential")
    for mode in ("in-memory", "sequential"):
        shutil.rmtree(workdir / f"out-1b-{mode}")
    best = {m: min(r, key=lambda x: x["wall_s"]) for m, r in runs.items()}
    rss = {m: min(x["peak_rss_bytes"] for x in r) for m, r in runs.items()}
    out = {"model_bytes": folder_bytes(model), "runs": runs, "identical_tensors": identical,
           "rss_ratio": round(rss["sequential"] / rss["in-memory"], 3),
           "time_ratio": round(best["sequential"]["wall_s"] / best["in-memory"]["wall_s"], 3)}
    if llmc_python is not None:
        out["llmc_over_sequential_time"] = round(best["llm-compressor"]["wall_s"] / best["sequential"]["wall_s"], 3)
        out["llmc_over_sequential_rss"] = round(rss["llm-compressor"] / rss["sequential"], 3)
    return out


def table(results: dict) -> str:
    rows = ["| model | run | mode | wall (s) | peak RSS (GiB) | checkpoint (GB) | note |",
            "|---|---|---|---|---|---|---|"]
    if "7b" in results:
        r = results["7b"]
        s = r["fp8_static"]
        rows.append(f"| Llama-2-7B shape, bf16 ({r['model_bytes'] / 1e9:.1f} GB) | fp8-static, 32 x 512, "
                    f"--max-memory 4GB | {s['execution']['mode']} | {s['wall_s']:.0f} | "
                    f"{s['peak_rss_bytes'] / GiB:.2f} | {s['checkpoint_bytes'] / 1e9:.2f} | "
                    f"{s['seconds_per_layer']} s per layer |")
        c = min(r["copy"], key=lambda x: x["wall_s"])
        f = min(r["fp8_dynamic"], key=lambda x: x["wall_s"])
        rows.append(f"| | cp -r of the model folder | | {c['wall_s']:.0f} | {c['peak_rss_bytes'] / GiB:.2f} | "
                    f"{r['model_bytes'] / 1e9:.1f} | |")
        rows.append(f"| | fp8-dynamic | {f['execution']['mode']} | {f['wall_s']:.0f} | "
                    f"{f['peak_rss_bytes'] / GiB:.2f} | {f['checkpoint_bytes'] / 1e9:.2f} | "
                    f"**{r['data_free_over_copy']}x** the copy |")
    if "1b" in results:
        r = results["1b"]
        for mode, runs in r["runs"].items():
            best = min(runs, key=lambda x: x["wall_s"])
            rss = min(x["peak_rss_bytes"] for x in runs)
            note = (f"RSS **{r['rss_ratio']}x**, time **{r['time_ratio']}x** in-memory; identical tensors: "
                    f"{r['identical_tensors']}") if mode == "sequential" else ""
            if mode == "llm-compressor":
                version = runs[-1]["reference"].get("version")
                note = (f"llmcompressor {version} oneshot, bf16: time {r['llmc_over_sequential_time']}x, RSS "
                        f"{r['llmc_over_sequential_rss']}x calib sequential")
            rows.append(f"| Llama ~1.1B, bf16 ({r['model_bytes'] / 1e9:.1f} GB) | fp8-static, 32 x 512 | {mode} | "
                        f"{best['wall_s']:.0f} | {rss / GiB:.2f} | {best['checkpoint_bytes'] / 1e9:.2f} | {note} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/calib-bench-scale"))
    parser.add_argument("--parts", nargs="+", choices=["7b", "1b"], default=["1b", "7b"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cold", action="store_true",
                        help="empty the page cache before every timed run (needs root: /proc/sys/vm/drop_caches), "
                        "so copy and calib both read from the disk")
    parser.add_argument("--llmc-python", type=Path, default=ROOT.parent / "llmc-venv" / "bin" / "python",
                        help="python of llm-compressor's own venv (see scripts/llmcompressor_reference.py); "
                        "skipped when missing")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.cold:
        try:
            drop_caches()
        except OSError as exc:
            raise SystemExit(f"--cold needs to write {DROP_CACHES}: {exc}") from None
        COLD["on"] = True
    results = {"machine": {"cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]},
               "page_cache": "emptied before every timed run" if args.cold else "as the previous run left it"}
    if "1b" in args.parts:
        llmc = args.llmc_python if args.llmc_python.is_file() else None
        if llmc is None:
            print(f"no llm-compressor at {args.llmc_python}: its row is skipped", flush=True)
        results["1b"] = part_1b(args.workdir, args.repeats, llmc)
    if "7b" in args.parts:
        results["7b"] = part_7b(args.workdir, args.repeats)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
