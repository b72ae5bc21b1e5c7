#!/usr/bin/env python
"""Run an exported FP8 (fp8-static) checkpoint's Linear layers through a real
FP8 GEMM, as vLLM does, and compare with the dequantized reference.

For each quantized Linear: capture its real input on held-out text (FP32
model), quantize it with the stored ``input_scale`` (static per-tensor FP8),
and compute ``torch._scaled_mm(x_fp8, w_fp8.T, scale_a=input_scale,
scale_b=weight_scale)``. The reference is ``(x_fp8 * s_a) @ (w_fp8 * s_w).T``
in float32. Uses CUDA when present (sm89+ FP8 tensor cores), else torch's CPU
implementation of the same op.

    python scripts/check_fp8_gemm.py --checkpoint calib-out --model ORIGINAL_MODEL [--text FILE]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from calib.load import read_tensors  # noqa: E402
from calib.models import load_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an fp8-static calib checkpoint")
    parser.add_argument("--model", default=None, help="the original model it was made from (default: embedded)")
    parser.add_argument("--text", default=str(SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = read_tensors(args.checkpoint)[0]
    loaded = load_model(args.model)
    model = loaded.model.eval()
    names = sorted(k[: -len(".input_scale")] for k in tensors if k.endswith(".input_scale"))
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: inputs.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1]).float()))
        for n in names]
    text = Path(args.text).read_text()[-20000:]
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"][:, : args.tokens]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()

    worst_gemm, worst_quant = 0.0, 0.0
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; {len(names)} layers")
    for name in names:
        w = tensors[f"{name}.weight"].to(device)
        s_w = tensors[f"{name}.weight_scale"].float().to(device)
        s_x = tensors[f"{name}.input_scale"].float().to(device)
        assert w.dtype == torch.float8_e4m3fn and s_w.numel() == 1, f"{name}: not FP8 per-tensor"
        x = inputs[name].to(device)
        x_q = torch.clamp(x / s_x, -448, 448).to(torch.float8_e4m3fn)
        rows = x_q.shape[0] // 16 * 16  # scaled_mm wants dims divisible by 16
        x_q = x_q[:rows]
        out = torch._scaled_mm(x_q, w.t(), scale_a=s_x.reshape(()), scale_b=s_w.reshape(()),
                               out_dtype=torch.float32)
        ref = (x_q.float() * s_x) @ (w.float() * s_w).t()
        gemm_err = float((out - ref).norm() / ref.norm())
        original = model.get_submodule(name).weight.detach().float().to(device)
        exact = x[:rows] @ original.t()
        quant_err = float((out - exact).norm() / exact.norm())
        worst_gemm, worst_quant = max(worst_gemm, gemm_err), max(worst_quant, quant_err)
    print(f"max relative error, FP8 GEMM vs dequantized reference: {worst_gemm:.2e}")
    print(f"max relative error, FP8 GEMM vs the original FP32 layer: {worst_quant:.2e}")


if __name__ == "__main__":
    main()
