"""calib: post-training quantization calibration.

Calibrate a Hugging Face model on representative text, quantize its Linear
weights to FP8 (E4M3) or INT8 with their scales, and export a
compressed-tensors checkpoint that vLLM, SGLang and transformers load.

    import calib
    recipe = calib.load_recipe("fp8-static")
    report = calib.run(model="path/or/hub-id", recipe=recipe, output="out")

or step by step: ``calibrate`` -> ``quantize`` / ``export``; ``load`` reads a
checkpoint back.

The public names are imported on first use, so ``import calib`` (and the
``calib`` command's ``--help``, ``--version`` and recipe checks) do not pay for
importing torch and transformers.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "CalibrationSet": "calib.data",
    "build_calibration_set": "calib.data",
    "CalibInputError": "calib.errors",
    "DatasetError": "calib.errors",
    "ModelNotFoundError": "calib.errors",
    "RecipeError": "calib.errors",
    "load": "calib.load",
    "calibrate": "calib.calibration",
    "export": "calib.pipeline",
    "quantize": "calib.pipeline",
    "run": "calib.pipeline",
    "dry_run": "calib.pipeline",
    "quantize_data_free": "calib.stream",
    "calibrate_sequential": "calib.sequential",
    "QuantArgs": "calib.recipe",
    "Recipe": "calib.recipe",
    "bundled_recipes": "calib.recipe",
    "load_recipe": "calib.recipe",
    "parse_recipe": "calib.recipe",
}

__all__ = sorted(_EXPORTS)


# Three public functions share their name with a submodule (calib.load,
# calib.export, calib.quantize). Importing a submodule binds it on the package,
# which would hide the function; the package keeps the function instead.
_SHADOWED = {"load", "export", "quantize"}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'calib' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
