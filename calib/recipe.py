"""Recipes: the validated description of *what* to quantize and *how*.

One schema serves three readers: the YAML recipe a user writes, the
``quantization_config`` we write into ``config.json`` (compressed-tensors field
names, so the mapping is 1:1), and our own loader. A wrong recipe fails here,
before any model is loaded, with the file, the field path and what is allowed.
"""

from __future__ import annotations

import re
import reprlib
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
# Histogram bins: the observers re-bin by halving, so a power of two; memory is O(bins).
BINS_MIN, BINS_MAX = 16, 65536
# MSE clip search candidates: at least both ends of the search range.
GRID_MIN, GRID_MAX = 2, 1000
# The weight clip search minimises sum |error|^norm (activation histograms: norm 2 only).
NORM_MIN, NORM_MAX = 1.0, 8.0
# A recipe is a few dozen fields: anything far larger is a mistake or an attack.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_VALUES = 10_000
MAX_REPR_CHARS = 200
MAX_ERROR_LINES = 20

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 120, 120, 40


def short_repr(value: Any, limit: int = MAX_REPR_CHARS) -> str:
    """``repr`` bounded in work and length: a value from a YAML alias bomb would
    otherwise expand to hundreds of MB inside an error message."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def observer_kwargs_problem(observer: str, kwargs: dict[str, Any]) -> str | None:
    """The first out-of-range observer_kwargs value, as ``observer_kwargs.key: why``; None if all fit.

    Ranges follow what calib/observers.py implements, so a bad value fails here,
    before any model is loaded, instead of as a traceback when observers are built.
    """
    unknown = sorted(set(kwargs) - OBSERVER_KWARGS[observer], key=str)
    if unknown:
        allowed = sorted(OBSERVER_KWARGS[observer])
        return (f"observer_kwargs: unknown key(s) {short_repr(unknown)} for observer {observer} "
                f"(allowed: {allowed or 'none'})")
    bins = kwargs.get("bins")
    if "bins" in kwargs and not (_is_int(bins) and BINS_MIN <= bins <= BINS_MAX and not bins & (bins - 1)):
        return (f"observer_kwargs.bins: {short_repr(bins)} must be a power of two from {BINS_MIN} to {BINS_MAX} "
                "(e.g. 2048)")
    grid = kwargs.get("grid")
    if "grid" in kwargs and not (_is_int(grid) and GRID_MIN <= grid <= GRID_MAX):
        return f"observer_kwargs.grid: {short_repr(grid)} must be a whole number from {GRID_MIN} to {GRID_MAX}"
    norm = kwargs.get("norm")
    if "norm" in kwargs and not (_is_number(norm) and NORM_MIN <= float(norm) <= NORM_MAX):
        return (f"observer_kwargs.norm: {short_repr(norm)} must be a number from {NORM_MIN:g} to {NORM_MAX:g} "
                "(the exponent of the clip search's error: 2 is the squared error)")
    pct = kwargs.get("percentile")
    if "percentile" in kwargs and not (_is_number(pct) and 50.0 < float(pct) <= 100.0):
        return f"observer_kwargs.percentile: {short_repr(pct)} must be a number in (50, 100], e.g. 99.99"
    return None


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
    # calib's own (not written to config.json): FP8 per-tensor weights of fused siblings
    # (q/k/v, gate/up) get one scale, the group's largest ("shared"), or each its own ("per_shard";
    # vLLM then re-quantizes every shard to the largest at load). README: "FP8 weight scales".
    fused_scale: Literal["shared", "per_shard"] = "shared"

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
        problem = observer_kwargs_problem(self.observer, self.observer_kwargs)
        if problem:
            raise ValueError(problem)
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


class SmoothMapping(BaseModel):
    """One SmoothQuant rewrite, names relative to a decoder layer: the producer's
    output channels are divided by ``s``, the consumers' input columns multiplied."""

    model_config = ConfigDict(extra="forbid")

    producer: str = Field(min_length=1)
    consumers: list[str] = Field(min_length=1)


class SmoothQuantArgs(BaseModel):
    """SmoothQuant migration strength: ``s = max|x|^alpha / max|w|^(1 - alpha)``,
    one number for every pair, or ``search``: per pair, the alpha of ``grid``
    whose consumers' quantized output error on sampled calibration inputs is
    smallest (:func:`calib.algorithms.smoothquant.choose_smoothing`), found by
    ``search: descend`` (downhill from 0.8, the default) or ``search: full`` (every alpha);
    ``mappings`` replace the per-family defaults
    (:data:`calib.algorithms.smoothquant.DEFAULT_MAPPINGS`)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float | Literal["search"] = 0.5
    grid: list[float] | None = None  # alpha: search only; default 0.20, 0.25, ..., 0.95
    search: Literal["descend", "full"] | None = None  # alpha: search only; None is descend
    mappings: list[SmoothMapping] | None = None

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "search":
            raise ValueError(f"give a number between 0 and 1, or 'search' (per pair, from the grid), not {value!r}")
        if not isinstance(value, str) and isinstance(value, (int, float)) and not 0.0 < float(value) < 1.0:
            raise ValueError(f"Input should be greater than 0 and less than 1 (or 'search'), not {value}")
        return value

    @field_validator("grid")
    @classmethod
    def _grid(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if not value:
                raise ValueError("give at least one alpha to try")
            bad = [a for a in value if not 0.0 < a < 1.0]
            if bad:
                raise ValueError(f"every alpha must be between 0 and 1 (exclusive); got {bad}")
        return value

    @model_validator(mode="after")
    def _grid_needs_search(self) -> "SmoothQuantArgs":
        if self.grid is not None and self.alpha != "search":
            raise ValueError(f"grid: the alphas to try when alpha is 'search'; alpha is {self.alpha}")
        if self.search is not None and self.alpha != "search":
            raise ValueError(f"search: how the alphas of the grid are tried when alpha is 'search'; "
                             f"alpha is {self.alpha}")
        return self

    @property
    def searched(self) -> bool:
        return self.alpha == "search"

    @property
    def descends(self) -> bool:
        """``alpha: search`` walks downhill from 0.8 (:func:`calib.algorithms.smoothquant.descend_grid`)."""
        return self.search != "full"

    def mapping_list(self) -> list[tuple[str, list[str]]] | None:
        return None if self.mappings is None else [(m.producer, list(m.consumers)) for m in self.mappings]


class GPTQArgs(BaseModel):
    """GPTQ (error-compensating rounding of the weights, :mod:`calib.algorithms.gptq`)."""

    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(128, gt=0)
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)
    actorder: bool = True
    # Solve each layer's modules in call order in one pass, each on the inputs the
    # already-rounded modules before it give (q/k/v, then o, gate/up, down); false:
    # two passes a layer, every Hessian from the float layer (calib.in_order).
    true_sequential: bool = True


class CalibrationDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(256, gt=0)
    seq_len: int = Field(512, gt=0)
    batch_size: int = Field(8, gt=0)
    # MoE: run every calibration token through every expert for observation only (the
    # layer's output still follows the router), so no expert is calibrated on few tokens.
    moe_calibrate_all_experts: bool = False


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
    gptq: GPTQArgs | None = None
    calibration: CalibrationDefaults = Field(default_factory=CalibrationDefaults)

    @field_validator("targets", "ignore")
    @classmethod
    def _valid_patterns(cls, values: list[str]) -> list[str]:
        for value in values:
            if value.startswith("re:"):
                try:
                    re.compile(value[3:])
                except re.error as exc:
                    raise ValueError(f"{short_repr(value)} is not a valid regular expression ({exc})") from None
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
        # "shared" (the default) is accepted anywhere: a dumped recipe writes it for every role
        if w.fused_scale != "shared" and not (w.is_fp8 and w.strategy == "tensor"):
            raise ValueError(f"weights.fused_scale: only FP8 per-tensor weights choose between one scale per fused "
                             f"group and one per shard (these are {w.type}{w.num_bits} per {w.strategy}: each "
                             "projection keeps its own scales); remove it")
        for role, args in (("input_activations", a), ("kv_cache", kv)):
            if args is not None and args.fused_scale != "shared":
                raise ValueError(f"{role}.fused_scale: a weights field; fused siblings always share one input "
                                 "scale (they read the same tensor)")
            norm = args.observer_kwargs.get("norm", 2.0) if args is not None else 2.0
            if float(norm) != 2.0:
                raise ValueError(f"{role}.observer_kwargs.norm: {short_repr(norm)} is not supported for "
                                 "activations: their mse observer minimises the squared error over a histogram "
                                 "(norm 2); norm is for the weights' clip search")
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
            if w.type == "int" and w.strategy == "tensor":
                # SGLang 0.5.23 re-quantizes per-tensor INT8 weights through FP8: 127 comes back as 128,
                # which overflows int8. Per-channel scales load as they are everywhere.
                raise ValueError("weights.strategy: INT8 per-tensor weights with quantized activations are not "
                                 "servable everywhere (SGLang re-quantizes them through FP8 and 127 overflows to "
                                 "128); use strategy: channel")
            if a.type == "int" and a.dynamic and a.strategy == "tensor":
                raise ValueError("input_activations.strategy: INT8 dynamic activations are per token in vLLM and "
                                 "SGLang (neither has a dynamic per-tensor INT8 scheme); use strategy: token")
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
        return static_inputs or self.kv_cache is not None or self.smoothquant is not None or self.gptq is not None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        if not data["calibration"]["moe_calibrate_all_experts"]:
            del data["calibration"]["moe_calibrate_all_experts"]  # the default: recorded only when asked for
        return yaml.safe_dump(data, sort_keys=False)

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
            # The observer only says how the scales were chosen; a reader needs none. Other tools write
            # their own (llm-compressor: memoryless_minmax, static_minmax, ...): keep only ours.
            if keep.get("dynamic") or keep.get("observer") not in OBSERVER_KWARGS:
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
        return f"{path}: {short_repr(value)} is not one of {allowed}"
    if kind == "extra_forbidden":
        return f"{path}: unknown key (see recipes/ for the fields a recipe has)"
    if kind == "missing":
        return f"{path}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error" and re.match(r"^[\w.]+: ", message):
        # Cross-field checks start with the field they are about.
        return f"{path}.{message}" if path else message
    return f"{path}: {message} (got {short_repr(value)})"


def _validate(data: Any, source: str) -> Recipe:
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty (see recipes/fp8-static.yaml for a complete one)")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping of fields, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        lines = [_describe(err) for err in errors[:MAX_ERROR_LINES]]
        if len(errors) > MAX_ERROR_LINES:
            lines.append(f"... and {len(errors) - MAX_ERROR_LINES} more errors")
        raise RecipeError(f"{source}: invalid recipe:\n  " + "\n  ".join(lines)) from None


def bundled_recipes() -> dict[str, Path]:
    """Recipes shipped with calib, by name."""
    folder = resources.files("calib") / "recipes"
    return {Path(str(p)).stem: Path(str(p)) for p in sorted(folder.iterdir(), key=str)
            if str(p).endswith(".yaml")}


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def expanded_size(root: yaml.Node, cap: int) -> int:
    """Number of YAML nodes once every alias is expanded, stopped at ``cap``.

    Aliases share nodes, so 9 levels of 9 aliases are 90 nodes on the page but
    9^9 values once expanded; sizes are memoised per node, so this costs the
    size on the page. A recursive alias expands without end and counts as ``cap``.
    Iterative: deep nesting must not hit Python's recursion limit.
    """
    size: dict[int, int] = {}
    open_nodes: set[int] = set()  # the current path: seeing one again is a cycle
    stack = [root]
    while stack:
        node = stack[-1]
        key = id(node)
        if key in size:
            stack.pop()
            continue
        kids = _yaml_children(node)
        if key not in open_nodes:
            open_nodes.add(key)
            for kid in kids:
                if id(kid) in open_nodes:
                    return cap
                if id(kid) not in size:
                    stack.append(kid)
            continue
        size[key] = min(cap, 1 + sum(size[id(kid)] for kid in kids))
        open_nodes.discard(key)
        stack.pop()
    return size[id(root)]


def _load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses documents expanding to absurd sizes."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node, MAX_YAML_VALUES + 1) > MAX_YAML_VALUES:
            raise RecipeError(f"{source}: the YAML expands to more than {MAX_YAML_VALUES} values (anchors and "
                              "aliases nested or recursive); a recipe is a few dozen fields: write them out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_recipe(text: str, source: str = "<string>") -> Recipe:
    try:
        data = _load_yaml(text, source)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{source}: not valid YAML for a recipe: nested too deeply") from None
    return _validate(data, source)


def read_recipe_text(path: Path) -> str:
    """The recipe file as text, or a RecipeError naming the file (size, encoding, access)."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: a recipe is a small YAML file; this one is {size} bytes (limit "
                              f"{MAX_RECIPE_BYTES}). Check the path.")
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{byte:02x} at offset {exc.start}): save the recipe as "
                          "UTF-8") from None


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A bundled recipe by name (``fp8-static``) or a YAML file by path."""
    path = Path(name_or_path)
    if not path.is_file():
        bundled = bundled_recipes()
        if str(name_or_path) in bundled:
            path = bundled[str(name_or_path)]
        else:
            raise RecipeError(
                f"recipe {short_repr(str(name_or_path))} is neither a file nor a bundled recipe "
                f"(bundled: {', '.join(bundled)}). Pass a recipe name or a path to a YAML file."
            )
    return parse_recipe(read_recipe_text(path), source=str(path))
