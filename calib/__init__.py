"""calib: post-training quantization calibration.

Calibrate a Hugging Face model on representative text, quantize its Linear
weights to FP8 (E4M3) or INT8 with their scales, and export a
compressed-tensors checkpoint that vLLM, SGLang and transformers load.

    import calib
    recipe = calib.load_recipe("fp8-static")
    report = calib.run(model="path/or/hub-id", recipe=recipe, output="out")

or step by step: ``calibrate`` -> ``quantize`` / ``export``; ``load`` reads a
checkpoint back.
"""

__version__ = "0.1.0"

from calib.data import CalibrationSet, build_calibration_set  # noqa: E402
from calib.errors import CalibInputError, DatasetError, ModelNotFoundError, RecipeError  # noqa: E402
from calib.load import load  # noqa: E402
from calib.pipeline import calibrate, export, quantize, run  # noqa: E402
from calib.recipe import QuantArgs, Recipe, bundled_recipes, load_recipe, parse_recipe  # noqa: E402

__all__ = [
    "CalibInputError",
    "CalibrationSet",
    "DatasetError",
    "ModelNotFoundError",
    "QuantArgs",
    "Recipe",
    "RecipeError",
    "build_calibration_set",
    "bundled_recipes",
    "calibrate",
    "export",
    "load",
    "load_recipe",
    "parse_recipe",
    "quantize",
    "run",
]
