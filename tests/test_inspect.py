"""`calib inspect` on real checkpoints: the numbers it prints are the stored ones,
its SQNR is the hand-computed one, and bad folders get clear errors."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from calib import qmath
from calib.cli import main
from conftest import TINYSTORIES


def test_inspect_reports_scales_sqnr_kv_and_memory(checkpoints, tmp_path, capsys):
    folder = checkpoints["fp8-static-kv"][0]
    png = tmp_path / "layers.png"
    assert main(["inspect", str(folder), "--original", str(TINYSTORIES), "--plot", str(png), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["layers_quantized"] == 28 and result["ignore"] == ["lm_head"]
    assert result["scheme"]["weights"]["type"] == "float" and result["scheme"]["kv_cache"]["num_bits"] == 8
    stored = load_file(str(folder / "model.safetensors"))
    original = load_file(str(TINYSTORIES / "model.safetensors"))
    layer = next(e for e in result["layers"] if e["name"] == "model.layers.3.mlp.down_proj")
    name = layer["name"]
    dequantized = stored[f"{name}.weight"].float() * stored[f"{name}.weight_scale"].float()
    assert layer["weight_sqnr_db"] == qmath.sqnr_db(original[f"{name}.weight"], dequantized)
    assert 25 < layer["weight_sqnr_db"] < 40  # FP8 E4M3 keeps about 31 dB on Gaussian-like weights
    assert layer["input_scale"] == stored[f"{name}.input_scale"].item()
    assert layer["weight_scale_range"] == [stored[f"{name}.weight_scale"].item()] * 2
    kv = result["kv_cache_scales"]["model.layers.0.self_attn"]
    assert kv["k_scale"] == stored["model.layers.0.self_attn.k_scale"].item()
    assert len(result["worst_layers"]) == 5
    assert result["worst_layers"][0]["weight_sqnr_db"] == min(e["weight_sqnr_db"] for e in result["layers"])
    mem = result["memory"]
    assert mem["weights_bytes_after"] < mem["weights_bytes_before"]
    # 4 layers x 2 KV heads x head_dim 16 x (K and V): float32 before, FP8 after
    assert (mem["kv_bytes_per_token_before"], mem["kv_bytes_per_token_after"]) == (1024, 256)
    assert result["provenance"]["model"] == "tinystories-llama-263k"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a packed INT4 checkpoint, as a table
    assert main(["inspect", str(checkpoints["int4-w4a16"][0]), "--original", str(TINYSTORIES)]) == 0
    table = capsys.readouterr().out
    assert "INT4 group" in table and "worst" in table


def test_inspect_refuses_folders_that_are_not_quantized_checkpoints(tmp_path, capsys):
    assert main(["inspect", str(TINYSTORIES)]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nothing-here")]) == 2
    assert "is not a folder" in capsys.readouterr().err
