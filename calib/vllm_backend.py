"""``calib eval --backend vllm``: the checkpoint scored by real vLLM, on calib's own token windows.

vLLM pins its own torch and transformers, so it usually lives in a venv of its
own: calib never imports it. It writes the windows the other backends score to
a JSON file and runs :mod:`calib.vllm_runner` (a standalone script) by path with
vLLM's python, once on the original and once on the checkpoint. vLLM's CPU build
serves INT8 W8A8 in bfloat16 only, while calib scores the original in float32,
so the row's ratio is vLLM-quantized / vLLM-original: both in the same dtype and
kernels, the quantization's cost alone.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from calib.errors import CalibInputError
from calib.vllm_runner import PROGRESS_TAG

log = logging.getLogger("calib.eval")
RUNNER = Path(__file__).with_name("vllm_runner.py")
ENV_VAR = "CALIB_VLLM_PYTHON"
DEFAULT_DTYPE = "bfloat16"  # vLLM-CPU runs INT8 W8A8 in bf16 only (float32 raises, float16 aborts)
DTYPES = ("bfloat16", "float16", "float32", "auto")
TAIL_LINES = 40  # of the runner's output, kept for the error message
SHOWN_LINES = 4  # of those, shown after the error line
PROBE = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt)\b(?::|$)")
RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s*")  # vLLM re-prints a worker's traceback under this prefix


@dataclass(frozen=True)
class VllmPython:
    """The interpreter that runs the runner, and which setting named it (for messages)."""

    path: str
    found_by: str


def find_vllm_python(explicit: str | None = None) -> VllmPython:
    """``--vllm-python``, else ``$CALIB_VLLM_PYTHON``, else this interpreter if it has vLLM.

    A python named explicitly must have vLLM: falling back to another one would
    score with a vLLM the user did not ask for."""
    if explicit:
        return _checked(explicit, "--vllm-python")
    if os.environ.get(ENV_VAR):
        return _checked(os.environ[ENV_VAR], ENV_VAR)
    if importlib.util.find_spec("vllm") is not None:
        return VllmPython(sys.executable, "this interpreter")
    raise CalibInputError(
        f"--backend vllm needs vLLM and none was found: --vllm-python was not given, {ENV_VAR} is not set, and "
        f"this interpreter ({sys.executable}) has no vllm module. vLLM usually lives in a venv of its own: pass "
        f"--vllm-python VENV/bin/python (or set {ENV_VAR}) to the python of a venv with vLLM installed.")


def _checked(python: str, found_by: str) -> VllmPython:
    """The python a setting names exists, runs, and can find the vllm module (cheap: nothing is imported)."""
    path = Path(python).expanduser().absolute()  # not resolve(): a venv's bin/python is a symlink out of the venv
    if path.is_dir():
        raise CalibInputError(f"{found_by} {path} is a folder: pass the venv's python, e.g. {path}/bin/python")
    if not path.is_file():
        raise CalibInputError(f"{found_by} {path} does not exist: pass the python of a venv with vLLM installed "
                              "(VENV/bin/python)")
    try:
        probe = subprocess.run([str(path), "-c", PROBE], capture_output=True, text=True, timeout=120)
    except OSError as exc:
        raise CalibInputError(f"{found_by} {path} cannot be run ({exc}): pass a python interpreter") from None
    if probe.returncode == 3:
        raise CalibInputError(f"{found_by} {path} has no vllm module: install vLLM in that venv or pass the python "
                              "of one that has it")
    if probe.returncode != 0:
        raise CalibInputError(f"{found_by} {path} is not a working python (exit {probe.returncode}: "
                              f"{probe.stderr.strip()[-300:]})")
    return VllmPython(str(path), found_by)


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise CalibInputError(f"--vllm-dtype {dtype!r}: choose from {', '.join(DTYPES)}")


def check_causal_lm(folder: Path) -> None:
    """Backend vllm scores perplexity through vLLM's generate API: causal LMs only (from config.json alone)."""
    from types import SimpleNamespace

    from calib.models import _is_causal_lm

    path = folder / "config.json"
    if not path.is_file():
        return  # check_same_model names the missing config.json
    config = json.loads(path.read_text())
    if not _is_causal_lm(SimpleNamespace(**config)):
        kind = (config.get("architectures") or [config.get("model_type", "model")])[0]
        raise CalibInputError(f"--backend vllm scores causal LMs only (perplexity), and {folder.name} is an encoder "
                              f"({kind}): use --backend calib, weights or transformers for its embedding cosine")


def original_folder(original: str | None, model, tokenizer, scratch: Path) -> Path:
    """A folder vLLM can load for the original: the user's own safetensors folder as it is, else (GGUF, the
    embedded default, pickle weights, hub ids) the model calib loaded, written as float32 safetensors."""
    from calib.models import resolve_source

    location, gguf_file = resolve_source(original)
    folder = Path(location)
    if gguf_file is None and (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    return write_float_folder(model, tokenizer, scratch / "original")


def write_float_folder(model, tokenizer, folder: Path) -> Path:
    """The loaded model as a plain safetensors folder (config without any quantization_config)."""
    from calib.export import save_safetensors
    from calib.moe import LinearExperts

    if any(isinstance(m, LinearExperts) for m in model.modules()):
        raise CalibInputError("--backend vllm needs the original MoE model as a safetensors folder (calib's "
                              "in-memory layout of its experts is not the one vLLM reads): pass --model FOLDER")
    log.info("vllm: writing the original as a float safetensors folder for vLLM")
    folder.mkdir(parents=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_safetensors(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # a GGUF-loaded config describes the GGUF's quantization
    config.pop("torch_dtype", None)
    config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config["architectures"] = config.get("architectures") or [type(model).__name__]  # GGUF configs have none
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tokenizer.save_pretrained(str(folder))
    return folder


def run_runner(python: VllmPython, model: Path, windows_file: Path, dtype: str, label: str) -> dict:
    """Score the windows with ``model`` in vLLM; the runner's JSON result, or a CalibInputError naming why not."""
    output = windows_file.with_name(f"{label}.json")
    cmd = [python.path, str(RUNNER), "--model", str(model), "--windows", str(windows_file), "--output",
           str(output), "--dtype", dtype]
    log.info("vllm: scoring the %s (%s) in vLLM, %s, with %s (%s); loading takes minutes", label, model.name,
             dtype, python.path, python.found_by)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        try:
            for line in proc.stdout:
                line = line.rstrip()
                tail.append(line)
                if line.startswith(PROGRESS_TAG):
                    log.info("vllm %s: %s", label, line[len(PROGRESS_TAG):].strip())
                else:
                    log.debug("vllm: %s", line)
            code = proc.wait()
        except BaseException:  # Ctrl-C / SIGTERM: vLLM must not outlive calib
            proc.kill()
            raise
    if code != 0 or not output.is_file():
        raise CalibInputError(failure_message(label, model.name, code, list(tail)))
    return json.loads(output.read_text())


def failure_message(label: str, name: str, code: int, lines: list[str]) -> str:
    """One paragraph: the exception vLLM raised (its last ``...Error: ...`` line) and the output's last lines."""
    lines = [RANK_PREFIX.sub("", line).strip() for line in lines]
    lines = [line for line in lines if line.strip("^~ ")]  # no blanks, no traceback underlines
    errors = [line for line in lines if ERROR_LINE.match(line)]
    if code < 0:
        why = f"was killed by {signal.Signals(-code).name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    else:
        why = f"failed (exit {code})"
    text = f"vLLM {why} on the {label} {name}"
    if errors:
        text += f": {errors[-1]}"
    last = [line for line in lines[-SHOWN_LINES:] if not errors or line != errors[-1]]
    if last:
        text += "; last lines of its output: " + " | ".join(last)
    if not lines:
        text += " with no output"
    return text


def vllm_row(python: VllmPython, original: Path, quantized: Path, windows: torch.Tensor, dtype: str,
             float_value: float) -> dict:
    """The eval row: vLLM's perplexity of the checkpoint, its ratio to vLLM's of the original, and notes."""
    expected = int(windows.shape[0]) * (int(windows.shape[1]) - 1)
    with tempfile.TemporaryDirectory(prefix="calib-vllm-") as scratch:
        windows_file = Path(scratch) / "windows.json"
        windows_file.write_text(json.dumps({"windows": windows.tolist()}))
        results = {label: run_runner(python, folder, windows_file, dtype, label)
                   for label, folder in (("original", original), ("quantized", quantized))}
    for label, result in results.items():
        if result["tokens"] != expected:
            raise RuntimeError(f"vLLM scored {result['tokens']} tokens of the {label}, calib's windows hold "
                               f"{expected}")
    base, quant = (math.exp(results[k]["nll"] / expected) for k in ("original", "quantized"))
    ran = results["quantized"]
    return {"value": quant, "nll_per_token": ran["nll"] / expected, "ratio": quant / base,
            "original_value": base, "ratio_to_float_original": quant / float_value,
            "vllm_version": ran["vllm_version"], "vllm_dtype": ran["dtype"], "kernels": ran.get("kernels", {}),
            "load_s": {k: r["load_s"] for k, r in results.items()},
            "notes": row_notes(ran, base, float_value)}


def row_notes(ran: dict, base: float, float_value: float) -> list[str]:
    """What ran (vLLM version, dtype), what the ratio is against, and a kernel that ignored static scales."""
    quantization = f" ({ran['quantization']})" if ran.get("quantization") else ""
    notes = [f"vLLM {ran['vllm_version']}{quantization} in {ran['dtype']}; ratio to the original in vLLM "
             f"({ran['dtype']}), perplexity {base:.4f} (the float32 original above: {float_value:.4f})"]
    if ran.get("static_input_scales_ignored"):
        notes.append(f"{ran['static_input_scales_ignored']} layers with static input scales ran in a vLLM kernel "
                     "that quantizes activations per token and ignores input_scale (vLLM-CPU's AMX INT8 path): "
                     "this row does not test the static scales")
    return notes
