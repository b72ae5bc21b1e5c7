"""``calib inspect``: what a compressed-tensors checkpoint holds, layer by layer.

Reads any compressed-tensors checkpoint (calib's or another tool's) one tensor
at a time: the scheme and ignored modules, per-layer weight and input scale
ranges, KV-cache scales, provenance, weight memory and KV-cache bytes per token
before and after. With the original model it adds each layer's weight SQNR
(``10 log10(|W|^2 / |W - dequant(Q)|^2)``) and names the worst layers.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from calib import qmath
from calib.errors import CalibInputError, ModelNotFoundError

WORST = 5
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder} is not a folder")
    if not path.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json: not a checkpoint folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CalibInputError(f"{path} is not valid JSON ({exc})") from None
    qc = raw.get("quantization_config")
    if not qc:
        raise CalibInputError(f"{folder} is not a quantized checkpoint: its config.json has no quantization_config")
    if qc.get("quant_method") != "compressed-tensors":
        raise CalibInputError(f"{folder}: quantization_config.quant_method is {qc.get('quant_method')!r}; calib "
                              "inspects compressed-tensors checkpoints")
    return raw


def _natural(name: str) -> list:
    """``layers.10`` after ``layers.9``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _range(t: torch.Tensor) -> list[float]:
    t = t.float()
    return [float(t.min()), float(t.max())]


def _original_source(original: str):
    """The original's tensors under checkpoint names: a safetensors folder as is, else loaded."""
    from calib.checkpoint import SafetensorsSource, StateDictSource

    path = Path(original).expanduser()
    if path.is_dir() and (any(path.glob("*.safetensors"))):
        return SafetensorsSource(path)
    from calib.models import load_model

    return StateDictSource(load_model(original, dtype="float32").model)


def inspect_checkpoint(folder: str | Path, original: str | None = None) -> dict:
    """Everything ``calib inspect`` shows, JSON-ready."""
    from calib.checkpoint import SafetensorsSource
    from calib.load import SCALE_SUFFIXES, dequantize_state_dict, unpacked
    from calib.recipe import Recipe, RecipeError

    folder = Path(folder).expanduser()
    raw = _read_config(folder)
    qc = raw["quantization_config"]
    try:
        recipe = Recipe.from_quantization_config(qc)
    except RecipeError as exc:
        raise CalibInputError(f"{folder}: its quantization_config is not one calib can read: {exc}") from None
    source = SafetensorsSource(folder)
    names = source.names()
    reference = _original_source(original) if original else None
    ref_names = set(reference.names()) if reference is not None else set()
    model_dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16").replace("torch.", "")
    before_bytes_per = _DTYPE_BYTES.get(model_dtype, 2)
    name_set = set(names)
    layers, kv = [], {}
    bytes_after = bytes_before = 0
    quantized = sorted((n[: -len(".weight_scale")] for n in names if n.endswith(".weight_scale")), key=_natural)
    quantized_tensors = set()
    for base in quantized:
        parts = {n: source.get(n) for n in (f"{base}.{s}" for s in ("weight", "weight_packed", "weight_shape",
                                                                   "weight_scale", "weight_zero_point",
                                                                   "input_scale", "input_zero_point"))
                 if n in name_set}
        quantized_tensors.update(parts)
        stored = parts.get(f"{base}.weight", parts.get(f"{base}.weight_packed"))
        full = unpacked(parts, recipe.weights.num_bits)
        weight = dequantize_state_dict(full, dtype=torch.float32)[f"{base}.weight"]
        scale = parts[f"{base}.weight_scale"]
        entry = {
            "name": base, "shape": list(weight.shape), "stored_dtype": str(stored.dtype).replace("torch.", ""),
            "weight_scale_shape": list(scale.shape), "weight_scale_range": _range(scale),
            "weight_absmax": float(weight.abs().max()),
        }
        if f"{base}.input_scale" in parts:
            entry["input_scale"] = float(parts[f"{base}.input_scale"].float().max())
            entry["input_absmax_covered"] = entry["input_scale"] * qmath.qmax_for(
                recipe.input_activations.num_bits, recipe.input_activations.type == "float")
        if f"{base}.input_zero_point" in parts:
            entry["input_zero_point"] = int(parts[f"{base}.input_zero_point"].reshape(-1)[0])
        if reference is not None and f"{base}.weight" in ref_names:
            w = reference.get(f"{base}.weight").float()
            entry["weight_sqnr_db"] = qmath.sqnr_db(w, weight)
            entry["weight_rel_error"] = float((w - weight).norm() / w.norm().clamp(min=1e-30))
        layers.append(entry)
        bytes_after += sum(t.numel() * t.element_size() for t in parts.values())
        bytes_before += weight.numel() * before_bytes_per
    for name in names:
        if name in quantized_tensors:
            continue
        dtype, shape = source.info(name)
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if name.endswith((".k_scale", ".v_scale")):
            attn, which = name.rsplit(".", 1)
            kv.setdefault(attn, {})[which] = float(source.get(name).float().max())
            bytes_after += size
            continue
        if name.endswith(SCALE_SUFFIXES):
            bytes_after += size
            continue
        bytes_after += size
        bytes_before += size
    source.close()
    result = {
        "checkpoint": folder.name,
        "architecture": (raw.get("architectures") or ["?"])[0],
        "format": qc.get("format"),
        "scheme": {"weights": recipe.weights.to_compressed_tensors(),
                   "input_activations": recipe.input_activations.to_compressed_tensors()
                   if recipe.input_activations else None,
                   "kv_cache": recipe.kv_cache.to_compressed_tensors() if recipe.kv_cache else None,
                   "targets": recipe.targets},
        "ignore": list(qc.get("ignore") or []),
        "layers_quantized": len(layers),
        "layers": layers,
        "kv_cache_scales": kv,
        "memory": {"weights_bytes_before": bytes_before, "weights_bytes_after": bytes_after,
                   "model_dtype": model_dtype, **_kv_bytes(raw, before_bytes_per, recipe.kv_cache is not None)},
        "provenance": _provenance(folder),
    }
    if reference is not None:
        scored = [entry for entry in layers if "weight_sqnr_db" in entry]
        result["original"] = Path(original).name
        result["worst_layers"] = [{"name": e["name"], "weight_sqnr_db": e["weight_sqnr_db"]}
                                  for e in sorted(scored, key=lambda e: e["weight_sqnr_db"])[:WORST]]
        missing = [e["name"] for e in layers if "weight_sqnr_db" not in e]
        if missing:
            raise CalibInputError(f"the original {original} has no weight for {missing[:3]} "
                                  f"({len(missing)} layers): is it the model this checkpoint was made from?")
    return result


def _kv_bytes(raw: dict, dtype_bytes: int, fp8_cache: bool) -> dict:
    """KV-cache bytes per token (all layers, K and V) in the model dtype and as the checkpoint asks."""
    text = raw.get("text_config") or raw
    layers = text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers")
    heads = text.get("num_attention_heads") or text.get("n_head")
    kv_heads = text.get("num_key_value_heads") or heads
    hidden = text.get("hidden_size") or text.get("n_embd") or text.get("d_model")
    head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        return {"kv_bytes_per_token_before": None, "kv_bytes_per_token_after": None}
    elements = 2 * layers * kv_heads * head_dim
    return {"kv_bytes_per_token_before": elements * dtype_bytes,
            "kv_bytes_per_token_after": elements * (1 if fp8_cache else dtype_bytes)}


def _provenance(folder: Path) -> dict:
    """The safetensors ``__metadata__`` (calib writes its version, recipe, data) and calib_report.json's summary."""
    from safetensors import safe_open

    out = {}
    files = sorted(folder.glob("*.safetensors"))
    if files:
        with safe_open(str(files[0]), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
        out = {k.removeprefix("calib_"): v for k, v in meta.items() if k not in ("format", "calib_recipe")}
        if "calib_recipe" in meta:
            out["recipe_yaml"] = meta["calib_recipe"]
    report = folder / "calib_report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        out["report"] = {k: data.get(k) for k in ("calib_version", "recipe", "dataset", "num_samples", "seq_len",
                                                  "calibration_tokens") if k in data}
    return out


def format_inspection(result: dict) -> str:
    """The few screens ``calib inspect`` prints."""
    mem = result["memory"]
    w = result["scheme"]["weights"]
    a = result["scheme"]["input_activations"]

    def args_text(args):
        if not args:
            return "none (float)"
        kind = f"{'FP' if args['type'] == 'float' else 'INT'}{args['num_bits']}"
        how = "dynamic" if args.get("dynamic") else "static"
        group = f" {args['group_size']}" if args.get("group_size") else ""
        return f"{kind} {args['strategy']}{group} {how}" + ("" if args.get("symmetric", True) else " asymmetric")

    lines = [
        f"calib inspect: {result['checkpoint']} ({result['architecture']}, format {result['format']})",
        f"  weights     {args_text(w)}",
        f"  activations {args_text(a)}",
        f"  kv cache    {args_text(result['scheme']['kv_cache'])}"
        + (f", scales in {len(result['kv_cache_scales'])} layers" if result["kv_cache_scales"] else ""),
        f"  ignored     {', '.join(result['ignore']) or 'nothing'}",
        f"  layers      {result['layers_quantized']} quantized",
        f"  weights     {mem['weights_bytes_before'] / 2**20:.1f} MiB ({mem['model_dtype']}) -> "
        f"{mem['weights_bytes_after'] / 2**20:.1f} MiB",
    ]
    if mem.get("kv_bytes_per_token_before"):
        lines.append(f"  kv cache    {mem['kv_bytes_per_token_before']:,} -> {mem['kv_bytes_per_token_after']:,} "
                     "bytes per token")
    prov = result["provenance"]
    if prov:
        keys = ("version", "model", "dataset", "num_samples", "seq_len", "observer")
        shown = ", ".join(f"{k} {prov[k]}" for k in keys if k in prov)
        if shown:
            lines.append(f"  provenance  {shown}")
    header = f"  {'layer':<44} {'weight scale':>21} {'input scale':>11}"
    has_sqnr = any("weight_sqnr_db" in e for e in result["layers"])
    lines.append(header + ("  SQNR dB" if has_sqnr else ""))
    for e in result["layers"]:
        lo, hi = e["weight_scale_range"]
        scale = f"{hi:.3e}" if lo == hi else f"{lo:.2e}..{hi:.2e}"
        row = f"  {e['name'][-44:]:<44} {scale:>21} {e.get('input_scale', float('nan')):>11.3e}"
        if has_sqnr:
            row += f"  {e.get('weight_sqnr_db', float('nan')):7.2f}"
        lines.append(row)
    for attn, s in result["kv_cache_scales"].items():
        lines.append(f"  {attn[-44:]:<44} k_scale {s.get('k_scale', float('nan')):.3e} "
                     f"v_scale {s.get('v_scale', float('nan')):.3e}")
    if result.get("worst_layers"):
        worst = ", ".join(f"{e['name']} {e['weight_sqnr_db']:.1f} dB" for e in result["worst_layers"])
        lines.append(f"  worst       {worst}")
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> None:
    """A PNG of per-layer input ranges, weight scales and (with the original) weight SQNR."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CalibInputError("--plot needs matplotlib: pip install matplotlib") from None
    layers = result["layers"]
    x = list(range(len(layers)))
    rows = 3 if any("weight_sqnr_db" in e for e in layers) else 2
    fig, axes = plt.subplots(rows, 1, figsize=(max(8, len(layers) * 0.12), 3 * rows), sharex=True)
    covered = [e.get("input_absmax_covered") for e in layers]
    if any(c is not None for c in covered):
        axes[0].semilogy(x, [c if c is not None else float("nan") for c in covered], ".", markersize=4)
        axes[0].set_ylabel("input range\n(scale x qmax)")
    else:
        axes[0].text(0.5, 0.5, "no static input scales (dynamic or weight-only)", ha="center",
                     transform=axes[0].transAxes)
    axes[1].semilogy(x, [e["weight_scale_range"][1] for e in layers], ".", markersize=4, label="max")
    axes[1].semilogy(x, [e["weight_scale_range"][0] for e in layers], ".", markersize=2, label="min")
    axes[1].set_ylabel("weight scale")
    axes[1].legend(loc="upper right", fontsize=7)
    if rows == 3:
        axes[2].plot(x, [e.get("weight_sqnr_db", float("nan")) for e in layers], ".", markersize=4)
        axes[2].set_ylabel("weight SQNR (dB)")
    axes[-1].set_xlabel("quantized layer (checkpoint order)")
    fig.suptitle(f"{result['checkpoint']}: {result['layers_quantized']} quantized layers", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
