"""Recipes: the validated description of *what* to quantize and *how*.

One schema serves three readers: the YAML recipe a user writes, the
``quantization_config`` we write into ``config.json`` (compressed-tensors field
names, so the mapping is 1:1), and our own loader. A wrong recipe fails here,
before any model is loaded, with the file, the field path and what is allowed.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calib.errors import RecipeError

OBSERVERS_FOR_WEIGHTS = ("minmax", "mse")
OBSERVERS_FOR_ACTIVATIONS = ("minmax", "percentile", "mse")
OBSERVER_KWARGS = {
    "minmax": set(),
    "percentile": {"percentile", "bins"},
    "mse": {"bins", "grid", "norm"},
}


class QuantArgs(BaseModel):
    """How one tensor kind (weights, input activations, KV cache) is quantized.

    Field names and meanings are compressed-tensors' ``QuantizationArgs``.
    """

    model_config = ConfigDict(extra="forbid")

    num_bits: Literal[4, 8] = 8
    type: Literal["int", "float"] = "int"
    symmetric: bool = True
    strategy: Literal["tensor", "channel", "group", "token"] = "tensor"
    group_size: int | None = None
    dynamic: bool = False
    observer: Literal["minmax", "percentile", "mse"] = "minmax"
    observer_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("group_size")
    @classmethod
    def _positive_group(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"{value} must be a positive integer")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "QuantArgs":
        if self.type == "float":
            if self.num_bits != 8:
                raise ValueError("num_bits: type float means FP8 (E4M3): num_bits must be 8")
            if not self.symmetric:
                raise ValueError("symmetric: FP8 is symmetric only: set symmetric: true")
        if self.strategy == "group" and self.group_size is None:
            raise ValueError("group_size: strategy group needs a group_size (e.g. 128)")
        if self.group_size is not None and self.strategy != "group":
            raise ValueError(f"group_size: only valid with strategy group, not {self.strategy}")
        if self.dynamic and ({"observer", "observer_kwargs"} & self.model_fields_set):
            raise ValueError("observer: dynamic scales are computed at run time from each token, so there is "
                             "nothing to observe: remove observer/observer_kwargs or set dynamic: false")
        if self.strategy == "token" and not self.dynamic:
            raise ValueError("strategy: token scales exist only at run time: set dynamic: true")
        allowed = OBSERVER_KWARGS[self.observer]
        unknown = sorted(set(self.observer_kwargs) - allowed)
        if unknown:
            raise ValueError(
                f"observer_kwargs: unknown key(s) {unknown} for observer {self.observer} "
                f"(allowed: {sorted(allowed) or 'none'})"
            )
        pct = self.observer_kwargs.get("percentile")
        if pct is not None and not (isinstance(pct, (int, float)) and 50.0 < float(pct) <= 100.0):
            raise ValueError(f"observer_kwargs.percentile: {pct!r} must be a number in (50, 100]")
        return self

    @property
    def is_fp8(self) -> bool:
        return self.type == "float"

    def to_compressed_tensors(self) -> dict[str, Any]:
        """Every key written out, as compressed-tensors' QuantizationArgs reads them."""
        return {
            "num_bits": self.num_bits,
            "type": self.type,
            "symmetric": self.symmetric,
            "group_size": self.group_size,
            "strategy": self.strategy,
            "block_structure": None,
            "dynamic": self.dynamic,
            "actorder": None,
            "observer": None if self.dynamic else self.observer,
            "observer_kwargs": dict(self.observer_kwargs),
        }


class SmoothQuantArgs(BaseModel):
    """SmoothQuant migration strength: ``s = max|x|^alpha / max|w|^(1 - alpha)``."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, gt=0.0, lt=1.0)


class CalibrationDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(256, gt=0)
    seq_len: int = Field(512, gt=0)
    batch_size: int = Field(8, gt=0)


class Recipe(BaseModel):
    """A quantization recipe: which modules, which scheme, calibration defaults."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    description: str = ""
    targets: list[str] = Field(default_factory=lambda: ["Linear"], min_length=1)
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    weights: QuantArgs
    input_activations: QuantArgs | None = None
    kv_cache: QuantArgs | None = None
    smoothquant: SmoothQuantArgs | None = None
    calibration: CalibrationDefaults = Field(default_factory=CalibrationDefaults)

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_patterns(cls, values: list[str]) -> list[str]:
        for value in values:
            if value.startswith("re:"):
                try:
                    re.compile(value[3:])
                except re.error as exc:
                    raise ValueError(f"{value!r} is not a valid regular expression ({exc})") from None
            elif not value:
                raise ValueError("empty name")
        return values

    @model_validator(mode="after")
    def _servable(self) -> "Recipe":
        w, a, kv = self.weights, self.input_activations, self.kv_cache
        if w.dynamic:
            raise ValueError("weights.dynamic: weights are quantized offline: dynamic must be false")
        if w.strategy == "token":
            raise ValueError("weights.strategy: token is for activations; use tensor, channel or group")
        if w.observer not in OBSERVERS_FOR_WEIGHTS:
            raise ValueError(f"weights.observer: {w.observer} is not one of {', '.join(OBSERVERS_FOR_WEIGHTS)}")
        if w.num_bits == 4:
            if w.type != "int" or a is not None:
                raise ValueError("weights.num_bits: 4-bit weights are INT4 weight-only: type int and no "
                                 "input_activations")
            if w.strategy not in ("channel", "group"):
                raise ValueError("weights.strategy: INT4 weights need channel or group scales")
        if a is not None:
            if a.type != w.type or a.num_bits != w.num_bits:
                raise ValueError(
                    f"input_activations.type: {a.type}{a.num_bits} activations with {w.type}{w.num_bits} "
                    "weights is not a scheme serving stacks run (use the same type and num_bits)"
                )
            if not w.symmetric:
                raise ValueError("weights.symmetric: W8A8 kernels need symmetric weights: set symmetric: true")
            if w.strategy == "group":
                raise ValueError("weights.strategy: group scales with quantized activations are not servable; "
                                 "use tensor or channel")
            if a.dynamic and a.strategy not in ("token", "tensor"):
                raise ValueError(f"input_activations.strategy: dynamic activations use token or tensor, "
                                 f"not {a.strategy}")
            if not a.dynamic and a.strategy != "tensor":
                raise ValueError(f"input_activations.strategy: static activations use tensor, not {a.strategy}")
            if a.observer not in OBSERVERS_FOR_ACTIVATIONS:
                raise ValueError(f"input_activations.observer: {a.observer} is not one of "
                                 f"{', '.join(OBSERVERS_FOR_ACTIVATIONS)}")
        if self.smoothquant is not None and a is None:
            raise ValueError("smoothquant: it flattens activation ranges for quantized activations; "
                             "a weight-only recipe has none (remove smoothquant or add input_activations)")
        if kv is not None:
            if not (kv.type == "float" and kv.num_bits == 8 and kv.strategy == "tensor"
                    and kv.symmetric and not kv.dynamic):
                raise ValueError("kv_cache: serving stacks read FP8 per-tensor static KV scales only: "
                                 "type float, num_bits 8, strategy tensor, symmetric true, dynamic false")
        return self

    @property
    def format(self) -> str:
        """compressed-tensors ``format`` of the checkpoint this recipe produces."""
        if self.input_activations is None:
            # INT weight-only is served from int32-packed weights (vLLM WNA16); FP8 weight-only unpacked.
            return "naive-quantized" if self.weights.is_fp8 else "pack-quantized"
        return "float-quantized" if self.weights.is_fp8 else "int-quantized"

    @property
    def needs_calibration(self) -> bool:
        """Whether any scale comes from activations (static inputs or KV cache)."""
        static_inputs = self.input_activations is not None and not self.input_activations.dynamic
        return static_inputs or self.kv_cache is not None or self.smoothquant is not None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def to_quantization_config(self, ignore: list[str] | None = None) -> dict[str, Any]:
        """The ``config.json`` ``quantization_config`` block (compressed-tensors)."""
        group = {
            "targets": list(self.targets),
            "weights": self.weights.to_compressed_tensors(),
            "input_activations": (
                self.input_activations.to_compressed_tensors() if self.input_activations else None
            ),
            "output_activations": None,
            "format": self.format,
        }
        return {
            "quant_method": "compressed-tensors",
            "format": self.format,
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": list(self.ignore if ignore is None else ignore),
            "kv_cache_scheme": self.kv_cache.to_compressed_tensors() if self.kv_cache else None,
            "global_compression_ratio": None,
            "sparsity_config": {},
        }

    @classmethod
    def from_quantization_config(cls, config: dict[str, Any]) -> "Recipe":
        """Read back a ``quantization_config`` that :meth:`to_quantization_config` wrote."""
        groups = config.get("config_groups") or {}
        if len(groups) != 1:
            raise RecipeError(f"expected one config group, found {len(groups)}")
        (group,) = groups.values()

        def args(raw: dict[str, Any] | None) -> dict[str, Any] | None:
            if raw is None:
                return None
            keep = {k: v for k, v in raw.items() if k in QuantArgs.model_fields and v is not None}
            if keep.get("dynamic"):
                keep.pop("observer", None)
                keep.pop("observer_kwargs", None)
            return keep

        data = {
            "targets": group["targets"],
            "ignore": config.get("ignore", []),
            "weights": args(group.get("weights")),
            "input_activations": args(group.get("input_activations")),
            "kv_cache": args(config.get("kv_cache_scheme")),
        }
        return _validate(data, source="config.json quantization_config")


def _describe(error: dict[str, Any]) -> str:
    """One line per pydantic error: ``field.path: what is wrong``."""
    path = ".".join(str(part) for part in error["loc"])
    kind, value = error["type"], error.get("input")
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        allowed = ", ".join(p.strip() for p in re.split(r",| or ", expected) if p.strip())
        return f"{path}: {value!r} is not one of {allowed}"
    if kind == "extra_forbidden":
        return f"{path}: unknown key (see recipes/ for the fields a recipe has)"
    if kind == "missing":
        return f"{path}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error" and re.match(r"^[\w.]+: ", message):
        # Cross-field checks start with the field they are about.
        return f"{path}.{message}" if path else message
    return f"{path}: {message} (got {value!r})"


def _validate(data: Any, source: str) -> Recipe:
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty (see recipes/fp8-static.yaml for a complete one)")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of fields, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(err) for err in exc.errors()]
        raise RecipeError(f"{source}: invalid recipe:\n  " + "\n  ".join(lines)) from None


def bundled_recipes() -> dict[str, Path]:
    """Recipes shipped with calib, by name."""
    folder = resources.files("calib") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=str)
            if str(p).endswith(".yaml")}


def parse_recipe(text: str, source: str = "<string>") -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}") from None
    return _validate(data, source)


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A bundled recipe by name (``fp8-static``) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        bundled = bundled_recipes()
        if str(name_or_path) in bundled:
            path = bundled[str(name_or_path)]
        else:
            raise RecipeError(
                f"recipe {str(name_or_path)!r} is neither a file nor a bundled recipe "
                f"(bundled: {', '.join(bundled)}). Pass a recipe name or a path to a YAML file."
            )
    return parse_recipe(path.read_text(encoding="utf-8"), source=str(path))
