#!/usr/bin/env python
"""A readable end-to-end example: FP8 W8A8 with an FP8 KV cache.

    python scripts/quantize_example.py --model PATH_OR_HUB_ID --dataset data.jsonl --output out

With no arguments: the embedded SmolLM2-135M on calib's own calibration texts.
"""

import argparse
import json

import calib
from calib.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--recipe", default="fp8-static-kv")
    parser.add_argument("--output", default="calib-example-out")
    args = parser.parse_args()

    # 1. The recipe says what to quantize and how; a bad one fails here, before loading anything.
    recipe = calib.load_recipe(args.recipe)

    # 2. The model and its tokenizer.
    loaded = load_model(args.model)

    # 3. Calibration data: packed, seeded token windows.
    data = calib.build_calibration_set(loaded.tokenizer, args.dataset, num_samples=64, seq_len=512)

    # 4. Calibrate: hooks feed observers while the model runs over the data.
    calibration = calib.calibrate(loaded.model, recipe, data, batch_size=8)

    # 5. Quantize + export a compressed-tensors checkpoint (atomically).
    summary = calib.export(loaded.model, recipe, args.output, calibration, tokenizer=loaded.tokenizer,
                           data=data, overwrite=True)
    print(json.dumps({"output": summary.output, "files": summary.files,
                      "layers": len(summary.result.layers), "kv_scales": len(summary.result.kv_scales)}, indent=2))


if __name__ == "__main__":
    main()
